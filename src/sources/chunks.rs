//! Where a CSV file can be cut into pieces that parse on their own: after a line break that
//! ends a record, never inside a quoted value. A large file is read and parsed piece by piece,
//! several pieces at once, instead of whole.
//!
//! The scan follows the CSV reader's own rules: a quote opens a quoted value only as the first
//! byte of a field, two quotes inside one stand for a quote, and a comment line (the `comment`
//! byte at the start of a record) is skipped whole. It jumps from quote to quote, so a file
//! without quotes costs two vectorised searches per piece.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use futures::stream::{self, BoxStream, StreamExt};
use object_store::{ObjectStore, ObjectStoreExt};

use tokio::sync::watch;

use super::csv::{self, Before};
use super::{ReadJob, SourceFile, blocking, read_error};
use crate::error::{Error, Result};
use crate::plan::{CsvSettings, Delimiter, Source};

/// Bytes a piece of a CSV file holds at least (the last piece may hold less).
pub const PIECE_BYTES: usize = 16 << 20;

/// Where the scan is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Lines still to pass over before the first record (`skip_rows`).
    Skipping(u64),
    /// Outside quotes; whether the byte before is a field's or record's start.
    Out { at_field_start: bool },
    /// Inside a quoted value.
    Quoted,
    /// Just after a quote inside a quoted value: a second quote stands for one, anything else
    /// closes the value.
    QuoteClosed,
    /// In a comment line.
    Comment,
}

/// Finds record ends in a growing buffer, scanning each byte once.
#[derive(Debug)]
pub(super) struct RecordEnds {
    quote: u8,
    delimiter: u8,
    comment: Option<u8>,
    state: State,
    /// Bytes of the buffer scanned.
    scanned: usize,
    /// The end of the last whole record seen.
    last_end: Option<usize>,
    /// Whether the file's first bytes are still to be checked for a UTF-8 byte-order mark.
    at_file_start: bool,
}

impl RecordEnds {
    /// A scan of a file read with `opts`; `None` when its pieces cannot be told apart without
    /// parsing (`delimiter: whitespace`, whose fields may start after blanks).
    pub(super) fn new(opts: &CsvSettings) -> Option<RecordEnds> {
        let Delimiter::Byte(delimiter) = opts.delimiter else {
            return None;
        };
        Some(RecordEnds {
            quote: opts.quote,
            delimiter,
            comment: opts.comment,
            state: match opts.skip_rows {
                0 => State::Out {
                    at_field_start: true,
                },
                n => State::Skipping(n),
            },
            scanned: 0,
            last_end: None,
            at_file_start: true,
        })
    }

    /// Scan what `buf` gained since the last call; the end of its last whole record (a
    /// position just after a line break), if one was seen. A UTF-8 byte-order mark at the very
    /// start is passed over.
    pub(super) fn scan(&mut self, buf: &[u8]) -> Option<usize> {
        const BOM: &[u8] = b"\xEF\xBB\xBF";
        if self.at_file_start {
            if buf.len() < BOM.len() && BOM.starts_with(buf) {
                return self.last_end; // the mark, or not: told by the next bytes
            }
            if buf.starts_with(BOM) {
                self.scanned = BOM.len();
            }
            self.at_file_start = false;
        }
        while self.scanned < buf.len() {
            self.step(buf);
        }
        self.last_end
    }

    /// The buffer's first `cut` bytes were taken away.
    pub(super) fn cut(&mut self, cut: usize) {
        self.scanned -= cut;
        self.last_end = self.last_end.filter(|e| *e > cut).map(|e| e - cut);
    }

    fn step(&mut self, buf: &[u8]) {
        let at = self.scanned;
        let rest = &buf[at..];
        match self.state {
            State::Skipping(n) => match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    self.scanned = at + i + 1;
                    self.state = match n {
                        1 => State::Out {
                            at_field_start: true,
                        },
                        _ => State::Skipping(n - 1),
                    };
                }
                None => self.scanned = buf.len(),
            },
            State::Comment => match memchr::memchr(b'\n', rest) {
                Some(i) => self.record_ends_at(at + i + 1),
                None => self.scanned = buf.len(),
            },
            State::Quoted => match memchr::memchr(self.quote, rest) {
                Some(i) => {
                    self.scanned = at + i + 1;
                    self.state = State::QuoteClosed;
                }
                None => self.scanned = buf.len(),
            },
            State::QuoteClosed => {
                if rest[0] == self.quote {
                    self.scanned = at + 1;
                    self.state = State::Quoted;
                } else {
                    self.state = State::Out {
                        at_field_start: false,
                    };
                }
            }
            State::Out { at_field_start } => self.step_out(buf, at_field_start),
        }
    }

    /// Outside quotes: on to the next quote, noting the last line break before it.
    fn step_out(&mut self, buf: &[u8], at_field_start: bool) {
        let at = self.scanned;
        let rest = &buf[at..];
        if let Some(comment) = self.comment
            && self.at_record_start(buf, at, at_field_start)
            && rest[0] == comment
        {
            self.scanned = at + 1;
            self.state = State::Comment;
            return;
        }
        let next_quote = memchr::memchr(self.quote, rest);
        let plain = &rest[..next_quote.unwrap_or(rest.len())];
        if self.comment.is_some() {
            // A record may start at any line break: go line by line.
            if let Some(i) = memchr::memchr(b'\n', plain) {
                self.record_ends_at(at + i + 1);
                return;
            }
        } else if let Some(i) = memchr::memrchr(b'\n', plain) {
            self.last_end = Some(at + i + 1);
        }
        let Some(q) = next_quote else {
            let last = buf[buf.len() - 1];
            self.scanned = buf.len();
            self.state = State::Out {
                at_field_start: self.is_boundary(last),
            };
            return;
        };
        let opens = match q {
            0 => at_field_start,
            _ => self.is_boundary(rest[q - 1]),
        };
        self.scanned = at + q + 1;
        self.state = match opens {
            true => State::Quoted,
            // A quote inside an unquoted value is part of it.
            false => State::Out {
                at_field_start: false,
            },
        };
    }

    fn record_ends_at(&mut self, end: usize) {
        self.scanned = end;
        self.last_end = Some(end);
        self.state = State::Out {
            at_field_start: true,
        };
    }

    /// Whether a field starts after `b`.
    fn is_boundary(&self, b: u8) -> bool {
        b == self.delimiter || b == b'\n' || b == b'\r'
    }

    /// Whether position `at` starts a record (and so may start a comment line).
    fn at_record_start(&self, buf: &[u8], at: usize, at_field_start: bool) -> bool {
        at_field_start && (at == 0 || matches!(buf[at - 1], b'\n' | b'\r'))
    }
}

/// What reading a CSV file piece by piece keeps between pieces.
struct PieceReader {
    source: Arc<Source>,
    opts: Arc<CsvSettings>,
    store: Arc<dyn ObjectStore>,
    file: Arc<SourceFile>,
    schema: SchemaRef,
    ends: RecordEnds,
    /// Bytes a piece holds at least.
    piece_bytes: usize,
    /// Bytes read and not yet handed out.
    buf: bytes::BytesMut,
    /// Where in the file the next read starts.
    offset: u64,
    /// The file's line the buffer starts on.
    line: u64,
    /// What the piece before the next one will tell it (`None` before the first piece).
    before: Option<watch::Receiver<Option<Before>>>,
    done: bool,
}

/// A CSV file's parse jobs, one per piece of at least `piece_bytes` (the last may hold less),
/// each created as its piece has been read.
pub(super) fn pieces(
    source: Arc<Source>,
    opts: Arc<CsvSettings>,
    store: Arc<dyn ObjectStore>,
    file: SourceFile,
    schema: SchemaRef,
    ends: RecordEnds,
    piece_bytes: usize,
) -> BoxStream<'static, ReadJob> {
    let reader = PieceReader {
        source,
        opts,
        store,
        file: Arc::new(file),
        schema,
        ends,
        piece_bytes,
        buf: bytes::BytesMut::new(),
        offset: 0,
        line: 1,
        before: None,
        done: false,
    };
    stream::unfold(reader, |mut r| async move {
        if r.done {
            return None;
        }
        let job = match r.next_piece().await {
            Ok((piece, last)) => r.parse_job(piece, last),
            Err(e) => {
                r.done = true;
                Box::pin(async move { Err(e) })
            }
        };
        Some((job, r))
    })
    .boxed()
}

impl PieceReader {
    /// The next piece: whole records, at least `piece_bytes` unless it is the last.
    async fn next_piece(&mut self) -> Result<(bytes::Bytes, bool)> {
        loop {
            if self.buf.len() >= self.piece_bytes
                && let Some(end) = self.ends.scan(&self.buf)
            {
                self.ends.cut(end);
                return Ok((self.buf.split_to(end).freeze(), false));
            }
            if self.offset >= self.file.size {
                self.done = true;
                return Ok((self.buf.split().freeze(), true));
            }
            let end = (self.offset + self.piece_bytes as u64).min(self.file.size);
            let got = self
                .store
                .get_range(&self.file.path, self.offset..end)
                .await
                .map_err(|e| read_error(&self.source, &self.file, &e))?;
            self.offset = end;
            self.buf.extend_from_slice(&got);
        }
    }

    /// The job that parses `piece` once the piece before has told it where the fields are.
    fn parse_job(&mut self, piece: bytes::Bytes, last: bool) -> ReadJob {
        let first_line = self.line;
        self.line += memchr::memchr_iter(b'\n', &piece).count() as u64;
        let (source, opts) = (self.source.clone(), self.opts.clone());
        let (file, schema) = (self.file.clone(), self.schema.clone());
        let (tell, next) = watch::channel(None);
        let before = self.before.replace(next);
        Box::pin(async move {
            let before = match before {
                None => Before::Nothing,
                Some(mut told) => match told.wait_for(Option::is_some).await {
                    Ok(b) => b.clone().unwrap_or(Before::NoRecord),
                    // The piece before failed, and its error is reported before this one.
                    Err(_) => return Err(Error::Internal("the piece before failed".into())),
                },
            };
            blocking(move || {
                let piece = csv::Piece {
                    bytes: &piece,
                    first_line,
                    before,
                    last,
                };
                csv::parse_piece(&source, &opts, &file.display, piece, schema, |b| {
                    tell.send_replace(Some(b));
                })
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::FileOutput;
    use super::*;
    use crate::plan::{FileFormat, Input};

    fn settings(f: impl FnOnce(&mut CsvSettings)) -> CsvSettings {
        let mut opts = CsvSettings::default();
        f(&mut opts);
        opts
    }

    /// Every place the bytes may be cut, fed to the scan `step` bytes at a time.
    fn ends(opts: &CsvSettings, text: &str, step: usize) -> Vec<usize> {
        let mut scan = RecordEnds::new(opts).expect("a delimiter");
        let mut found = Vec::new();
        let bytes = text.as_bytes();
        for end in (step..bytes.len() + step).step_by(step) {
            let end = end.min(bytes.len());
            if let Some(e) = scan.scan(&bytes[..end])
                && found.last() != Some(&e)
            {
                found.push(e);
            }
        }
        found
    }

    #[test]
    fn a_piece_ends_after_a_record_never_inside_quotes() {
        let opts = CsvSettings::default();
        let text = "id,note\n1,\"two\nlines\"\n2,\"a \"\"quoted\"\" word\"\n3,plain\n";
        let after_two_lines = text.find("2,").unwrap();
        let after_quoted = text.find("3,").unwrap();
        for step in [1, 2, 3, 7, text.len()] {
            let found = ends(&opts, text, step);
            assert!(
                found.iter().all(|e| text.as_bytes()[e - 1] == b'\n'),
                "{found:?}"
            );
            assert!(
                !found.contains(&text.find("lines").unwrap()),
                "cut inside quotes: {found:?}"
            );
            assert_eq!(found.last(), Some(&text.len()), "step {step}");
            if step == 1 {
                assert_eq!(found, vec![8, after_two_lines, after_quoted, text.len()]);
            }
        }
    }

    #[test]
    fn a_quote_inside_an_unquoted_value_does_not_open_one() {
        // `5"` is a value with a quote in it, as the reader reads it: the line ends a record.
        let opts = CsvSettings::default();
        let text = "1,5\" pipe\n2,\"x\ny\"\n3,z\n";
        assert_eq!(ends(&opts, text, 1), vec![10, 18, text.len()]);
    }

    #[test]
    fn skipped_lines_and_comment_lines_hold_no_quotes() {
        let opts = settings(|o| {
            o.skip_rows = 1;
            o.comment = Some(b'#');
        });
        let text = "title \" odd\n# a \" comment\nid,v\n1,\"a\nb\"\n";
        let found = ends(&opts, text, 1);
        assert_eq!(found.last(), Some(&text.len()));
        assert!(!found.contains(&text.find("b\"").unwrap()));
        assert!(found.contains(&text.find("id,").unwrap()));
    }

    #[test]
    fn a_byte_order_mark_is_passed_over_however_the_bytes_arrive() {
        // The quoted first value after the mark opens at its quote: no cut inside it.
        let opts = CsvSettings::default();
        let text = "\u{feff}\"a\nb\",1\n2,3\n";
        for step in [1, 2, 4, text.len()] {
            let found = ends(&opts, text, step);
            assert!(
                !found.contains(&text.find("b\"").unwrap()),
                "step {step}: {found:?}"
            );
            assert_eq!(found.last(), Some(&text.len()), "step {step}");
        }
    }

    #[test]
    fn an_unclosed_quote_runs_to_the_end() {
        let opts = CsvSettings::default();
        assert_eq!(ends(&opts, "1,a\n2,\"open\n3,b\n", 1), vec![4]);
    }

    /// The file read in pieces of at least `piece_bytes`, three parsed at a time.
    fn read_in_pieces(source: &Source, piece_bytes: usize) -> Vec<FileOutput> {
        let Input::Files {
            format: FileFormat::Csv(opts),
            location,
        } = &source.input
        else {
            panic!("a CSV source")
        };
        let store = crate::storage::store_for(&location.store_url).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listing = super::super::list_files(source, location, &store)
                .await
                .unwrap();
            let file = listing.files[0].clone();
            let ends = RecordEnds::new(opts).unwrap();
            let schema = super::super::table_schema(source);
            pieces(
                Arc::new(source.clone()),
                Arc::new(opts.clone()),
                store,
                file,
                schema,
                ends,
                piece_bytes,
            )
            .buffered(3)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()
            .unwrap()
        })
    }

    /// Pieces of every size give what the whole file gives: the same rows in order, the same
    /// rejects with their lines and raw text, the same counts.
    fn same_as_whole(csv: &str, schema: &str, text: &[u8]) {
        let (_dir, source) = super::super::tests::one_csv_source(csv, schema, text);
        // The file as the reader names it.
        let display = read_in_pieces(&source, text.len())[0].file.clone();
        let schema_ref = super::super::table_schema(&source);
        let whole = super::super::parse_file(&source, &display, text, schema_ref.clone()).unwrap();
        let rows = |outs: &[&FileOutput]| {
            let batches: Vec<_> = outs
                .iter()
                .flat_map(|o| o.batches.iter().cloned())
                .collect();
            arrow::compute::concat_batches(&schema_ref, &batches).unwrap()
        };
        for piece_bytes in [1, 5, 16, 40, text.len()] {
            let outs = read_in_pieces(&source, piece_bytes);
            let all: Vec<&FileOutput> = outs.iter().collect();
            assert_eq!(rows(&all), rows(&[&whole]), "rows, pieces of {piece_bytes}");
            let rejects: Vec<_> = outs.iter().flat_map(|o| o.rejects.clone()).collect();
            assert_eq!(rejects, whole.rejects, "rejects, pieces of {piece_bytes}");
            let read: u64 = outs.iter().map(|o| o.rows_read).sum();
            assert_eq!(read, whole.rows_read, "pieces of {piece_bytes}");
            let bytes: u64 = outs.iter().map(|o| o.bytes_read).sum();
            assert_eq!(bytes, text.len() as u64);
            assert!(!outs[0].continues && outs[1..].iter().all(|o| o.continues));
            if piece_bytes < 16 {
                assert!(outs.len() > 2, "{} pieces of {piece_bytes}", outs.len());
            }
        }
    }

    #[test]
    fn a_file_read_in_pieces_loads_as_it_does_whole() {
        // Quoted line breaks and quotes, CRLF, blank lines, a value that does not parse, a row
        // with a field too many, a quote inside an unquoted value, an unclosed quote at the end.
        same_as_whole(
            "{}",
            "{ id: int, note: string }",
            b"id,note\r\n1,\"two\r\nlines\"\r\n\r\nx,bad id\r\n2,\"say \"\"hi\"\"\"\r\n3,a,b\r\n\
              4,5\" pipe\r\n5,\"open\r\n6,never closed\r\n",
        );
        // No header, `|` closing every line (detected), a byte-order mark.
        same_as_whole(
            "{ delimiter: '|', header: false }",
            "{ a: int, b: string, c: date }",
            b"\xEF\xBB\xBF1|x|2024-01-02|\n2|\"y|z\"|2024-01-03|\n3|w|not a date|\n4|v|2024-01-05\n",
        );
        // Lines skipped, comment lines with quotes in them, Latin-1.
        same_as_whole(
            "{ skip_rows: 2, comment: '#', delimiter: ';', encoding: latin1 }",
            "{ name: string, n: int }",
            b"report \" of\nmonth\n# a \" quote\nname;n\nJos\xe9;1\n# more \"\n\"M\xfcller\";2\nX;y\n",
        );
    }

    #[test]
    fn whitespace_separated_files_are_not_cut() {
        let opts = settings(|o| o.delimiter = Delimiter::Whitespace);
        assert!(RecordEnds::new(&opts).is_none());
    }
}
