//! `kbcrm serve` under hostile and heavy use: statements too deep to plan, heavy queries
//! beside new logins, timeouts and cancels that must stop the work (measured in the server's
//! own CPU time), backend pids and cancel keys, raw protocol garbage and passwords, messages
//! too large to buffer, idle sockets that never log in, and a role's statement timeout that a
//! session cannot lift.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::serve::{
    code, connect, endless_rows, message, project, psql, rss_and_fds, rt, serve, texts,
};
use crate::support::{have, may_skip, stderr};

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds the process uses over `window`.
fn cpu_over(pid: u32, window: Duration) -> f64 {
    let before = cpu_seconds(pid);
    std::thread::sleep(window);
    cpu_seconds(pid) - before
}

/// The error a streaming query ends with (`what` names it when it ends without one).
async fn stream_error<S>(stream: &mut S, what: &str) -> tokio_postgres::Error
where
    S: futures::Stream<Item = Result<tokio_postgres::Row, tokio_postgres::Error>> + Unpin,
{
    use futures::StreamExt;
    loop {
        match stream.next().await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => return e,
            None => panic!("{what}: the rows ended without an error"),
        }
    }
}

/// The project of [`project`] with `from` replaced by `to` in its kbcrm.yaml.
fn project_with(from: &str, to: &str) -> crate::support::Project {
    let p = project("");
    let yaml = std::fs::read_to_string(p.path().join("kbcrm.yaml")).unwrap();
    assert!(yaml.contains(from), "{from} not in kbcrm.yaml");
    p.write("kbcrm.yaml", yaml.replace(from, to));
    p
}

/// A cross join that would run for hours.
const HEAVY: &str = "select count(*) from generate_series(1, 100000000) a, \
                     generate_series(1, 100000000) b";

#[test]
fn deep_and_wide_statements_are_refused_or_answered_and_never_crash() {
    let p = project("");
    let s = serve(&p);
    let chain = |op: &str, n: usize| format!("select {}", vec!["1"; n].join(op));
    let cases = [
        ("2,000 additions", chain("+", 2_000)),
        (
            "2,000 ANDs",
            format!("select {}", vec!["true"; 2_000].join(" and ")),
        ),
        (
            "2,000 ORs",
            format!("select {}", vec!["false"; 2_000].join(" or ")),
        ),
        (
            "2,000 concatenations",
            format!("select {}", vec!["'a'"; 2_000].join(" || ")),
        ),
        (
            "5,000-way UNION ALL",
            vec!["select 1"; 5_000].join(" union all "),
        ),
        ("50,000 additions", chain("+", 50_000)),
        (
            "200 nested parentheses",
            format!("select {}1{}", "(".repeat(200), ")".repeat(200)),
        ),
        (
            "a 10 MB literal",
            format!("select length('{}')", "x".repeat(10 << 20)),
        ),
    ];
    rt().block_on(async {
        for (what, sql) in &cases {
            let c = connect(s.port, "ann", "ann-pw-2025").await.unwrap();
            match c.simple_query(sql).await {
                Ok(_) => {}
                Err(e) => assert_eq!(code(&e), "54001", "{what}: {e:?}"),
            }
            // The server is still there for everyone.
            let other = connect(s.port, "ada", "ada long password")
                .await
                .unwrap_or_else(|e| panic!("after {what}: {e}"));
            assert_eq!(
                texts(&other, "select 41 + 1").await,
                vec![vec!["42"]],
                "{what}"
            );
        }
        // The depth limit's own message.
        let c = connect(s.port, "ann", "ann-pw-2025").await.unwrap();
        let e = c.simple_query(&chain("+", 50_000)).await.unwrap_err();
        assert!(message(&e).contains("statement too complex"), "{e:?}");
        // The extended protocol (a prepared statement) is measured the same way.
        let e = c.prepare(&chain("+", 50_000)).await.unwrap_err();
        assert_eq!(code(&e), "54001", "{e:?}");
        let stmt = c.prepare(&chain("+", 500)).await.unwrap();
        let n: i64 = c.query_one(&stmt, &[]).await.unwrap().get(0);
        assert_eq!(n, 500);
    });
}

#[test]
fn logins_are_answered_while_heavy_queries_and_cursors_run_and_timeouts_stop_the_work() {
    let p = project("");
    let s = serve(&p);
    let pid = s.child.id();
    let port = s.port;
    rt().block_on(async move {
        // One heavy query, and the same through a cursor (FETCH pulls its rows).
        let mut heavy = Vec::new();
        for cursor in [false, true] {
            heavy.push(tokio::spawn(async move {
                let c = connect(port, "ann", "ann-pw-2025").await.unwrap();
                c.batch_execute("set statement_timeout = '3s'")
                    .await
                    .unwrap();
                let started = Instant::now();
                let e = if cursor {
                    c.batch_execute(&format!("begin; declare heavy cursor for {HEAVY}"))
                        .await
                        .unwrap();
                    c.simple_query("fetch 1 from heavy").await.unwrap_err()
                } else {
                    c.simple_query(HEAVY).await.unwrap_err()
                };
                (code(&e), started.elapsed())
            }));
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        // Both cores are busy with the two queries; logins and small queries still answer.
        let mut logins = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            let c = connect(port, "ada", "ada long password").await.unwrap();
            assert_eq!(texts(&c, "select 1").await, vec![vec!["1"]]);
            logins.push(started.elapsed());
        }
        logins.sort();
        eprintln!("logins while two heavy queries ran: {logins:?}");
        assert!(
            logins[1] < Duration::from_secs(1),
            "a login and a small query took {logins:?} beside two heavy queries"
        );
        for h in heavy {
            let (code, took) = h.await.unwrap();
            assert_eq!(code, "57014");
            assert!(
                took < Duration::from_secs(6),
                "the timeout fired after {took:?}"
            );
        }
    });
    // The queries' work stopped with their answers: the server idles.
    std::thread::sleep(Duration::from_millis(500));
    let busy = cpu_over(pid, Duration::from_secs(2));
    assert!(
        busy < 0.4,
        "the server used {busy:.2} s of CPU in 2 s after both queries timed out"
    );
}

#[test]
fn each_connection_has_its_own_pid_and_a_cancel_stops_only_its_query() {
    let p = project_with("max_connections: 4", "max_connections: 10");
    let s = serve(&p);
    let pid = s.child.id();
    rt().block_on(async {
        use futures::StreamExt;
        let mut clients = Vec::new();
        let mut pids = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let c = connect(s.port, "ann", "ann-pw-2025").await.unwrap();
            let backend: i32 = c
                .query_one("select pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            pids.insert(backend);
            clients.push(c);
        }
        assert_eq!(pids.len(), 10, "backend pids repeat: {pids:?}");
        // Every client streams a long query; the fourth is cancelled from outside.
        let mut streams = Vec::new();
        for c in &clients {
            let stream = endless_rows(c).await;
            streams.push(Box::pin(stream));
        }
        for s in streams.iter_mut() {
            assert!(s.next().await.unwrap().is_ok());
        }
        clients[3].cancel_token().cancel_query(NoTls).await.unwrap();
        let err = stream_error(&mut streams[3], "the cancelled query").await;
        assert_eq!(code(&err), "57014", "{err:?}");
        assert!(message(&err).contains("user request"), "{err:?}");
        for (i, s) in streams.iter_mut().enumerate() {
            if i == 3 {
                continue;
            }
            for _ in 0..20_000 {
                assert!(
                    s.next().await.unwrap().is_ok(),
                    "client {i}'s query stopped with the other's cancel"
                );
            }
        }
        drop(streams);
        // At the connection limit (10 are open), a cancel request still gets through.
        let stream = endless_rows(&clients[5]).await;
        futures::pin_mut!(stream);
        assert!(stream.next().await.unwrap().is_ok());
        clients[5].cancel_token().cancel_query(NoTls).await.unwrap();
        let err = stream_error(&mut stream, "a query cancelled at the connection limit").await;
        assert_eq!(code(&err), "57014", "{err:?}");
        // A cancel whose key is wrong cancels nothing, and the connection stays usable.
        assert_eq!(texts(&clients[5], "select 5").await, vec![vec!["5"]]);
    });
    std::thread::sleep(Duration::from_millis(500));
    let busy = cpu_over(pid, Duration::from_secs(2));
    assert!(busy < 0.4, "{busy:.2} s of CPU in 2 s after the cancels");
}

/// A connection speaking the protocol by hand.
struct Raw {
    s: TcpStream,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw { s }
    }

    fn send(&mut self, bytes: &[u8]) {
        // The server may already have closed the connection.
        let _ = self.s.write_all(bytes);
    }

    fn startup(&mut self, user: &str) {
        let mut body = 196_608i32.to_be_bytes().to_vec();
        for (k, v) in [("user", user), ("database", "kbcrm")] {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        msg.extend(body);
        self.send(&msg);
    }

    fn typed(&mut self, kind: u8, body: &[u8]) {
        let mut msg = vec![kind];
        msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        msg.extend_from_slice(body);
        self.send(&msg);
    }

    /// The next message, or `None` when the server closed the connection.
    fn read(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.s.read_exact(&mut head).ok()?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        self.s.read_exact(&mut body).ok()?;
        Some((head[0], body))
    }

    /// Messages until an ErrorResponse (its SQLSTATE) or the end of the connection.
    fn error_code(&mut self) -> Option<String> {
        while let Some((kind, body)) = self.read() {
            if kind == b'E' {
                let mut fields = body.split(|b| *b == 0);
                return fields
                    .find(|f| f.first() == Some(&b'C'))
                    .map(|f| String::from_utf8_lossy(&f[1..]).to_string());
            }
        }
        None
    }

    /// Whether the server has closed the connection (reads end).
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1024];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                // Closed with data the server never read.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Log in with SCRAM-SHA-256 as a client library does.
    fn login(&mut self, user: &str, password: &str) {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        self.startup(user);
        let (kind, _) = self.read().unwrap();
        assert_eq!(kind, b'R');
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let mut first = b"SCRAM-SHA-256\0".to_vec();
        first.extend_from_slice(&(scram.message().len() as i32).to_be_bytes());
        first.extend_from_slice(scram.message());
        self.typed(b'p', &first);
        let (_, body) = self.read().unwrap();
        scram.update(&body[4..]).unwrap();
        self.typed(b'p', scram.message());
        let (_, body) = self.read().unwrap();
        scram.finish(&body[4..]).unwrap();
        loop {
            let (kind, _) = self.read().unwrap();
            if kind == b'Z' {
                break;
            }
        }
    }
}

#[test]
fn raw_passwords_and_protocol_garbage_are_refused_with_08p01() {
    let p = project("");
    let s = serve(&p);
    // A plain and an md5 password where SCRAM was asked for.
    for password in [
        &b"ann-pw-2025\0"[..],
        b"md5a3556571e93b0d20722ba62be61e8c2d\0",
    ] {
        let mut raw = Raw::connect(s.port);
        raw.startup("ann");
        let (kind, _) = raw.read().unwrap();
        assert_eq!(kind, b'R', "an authentication request");
        raw.typed(b'p', password);
        assert_eq!(raw.error_code().as_deref(), Some("08P01"));
        assert!(
            raw.closed(),
            "the connection stays open after a FATAL error"
        );
    }
    // Garbage in place of a startup message, and a message of an unknown type after login.
    let mut raw = Raw::connect(s.port);
    raw.send(b"\x00\x00\x00\x10GET / HTTP/1.1\r\n\r\n");
    assert!(matches!(raw.error_code().as_deref(), Some("08P01") | None));
    assert!(raw.closed());
    let mut raw = Raw::connect(s.port);
    raw.login("ann", "ann-pw-2025");
    raw.typed(b'!', b"hello");
    assert_eq!(raw.error_code().as_deref(), Some("08P01"));
    assert!(raw.closed());
    // A Bind whose lengths lie.
    let mut raw = Raw::connect(s.port);
    raw.login("ann", "ann-pw-2025");
    raw.typed(b'B', &[0, 0, 0xff, 0xff, 0x7f]);
    raw.typed(b'S', b"");
    assert!(
        matches!(raw.error_code().as_deref(), Some(c) if c.starts_with("08") || c == "22023" || c == "26000")
    );
    // Still serving.
    rt().block_on(async {
        let c = connect(s.port, "ann", "ann-pw-2025").await.unwrap();
        assert_eq!(texts(&c, "select 1").await, vec![vec!["1"]]);
    });
}

#[test]
fn messages_over_the_limit_are_refused_before_they_are_buffered() {
    let p = project("  max_message_size: 64KiB\n");
    let s = serve(&p);
    let pid = s.child.id();
    let (rss_before, _) = rss_and_fds(pid);
    // Before login: a startup message announcing 256 MiB, then its body trickling in.
    let mut raw = Raw::connect(s.port);
    raw.send(&(256u32 << 20).to_be_bytes());
    raw.send(&196_608i32.to_be_bytes());
    raw.send(&vec![b'x'; 1 << 20]);
    assert!(matches!(raw.error_code().as_deref(), Some("08P01") | None));
    assert!(raw.closed());
    // After SCRAM's first message, a Query of 256 MiB announced before login.
    let mut raw = Raw::connect(s.port);
    raw.startup("ann");
    raw.read().unwrap();
    raw.send(b"Q");
    raw.send(&(256u32 << 20).to_be_bytes());
    raw.send(&vec![b'x'; 1 << 20]);
    assert_eq!(raw.error_code().as_deref(), Some("08P01"));
    // Logged in: a query over serve.max_message_size is refused, one under it runs.
    let mut raw = Raw::connect(s.port);
    raw.login("ann", "ann-pw-2025");
    let mut q = format!("select length('{}')", "y".repeat(100 << 10)).into_bytes();
    q.push(0);
    raw.typed(b'Q', &q);
    assert_eq!(raw.error_code().as_deref(), Some("08P01"));
    assert!(raw.closed());
    rt().block_on(async {
        let c = connect(s.port, "ann", "ann-pw-2025").await.unwrap();
        let sql = format!("select length('{}')", "y".repeat(32 << 10));
        assert_eq!(texts(&c, &sql).await, vec![vec![(32 << 10).to_string()]]);
        let e = c
            .simple_query(&format!("select length('{}')", "y".repeat(100 << 10)))
            .await
            .unwrap_err();
        assert!(
            message(&e).contains("longer than the server accepts") || e.is_closed(),
            "{e:?}"
        );
    });
    let (rss_after, _) = rss_and_fds(pid);
    assert!(
        rss_after < rss_before + 100_000,
        "resident memory grew from {rss_before} kB to {rss_after} kB"
    );
}

#[test]
fn sockets_that_never_log_in_neither_lock_out_logins_nor_stay_open() {
    let p = project("  login_timeout: 2s\n  max_pending_logins: 16\n");
    let s = serve(&p);
    // 64 connections that send nothing.
    let mut idle: Vec<Raw> = (0..64).map(|_| Raw::connect(s.port)).collect();
    std::thread::sleep(Duration::from_millis(300));
    rt().block_on(async {
        let started = Instant::now();
        let c = connect(s.port, "ann", "ann-pw-2025").await.unwrap();
        assert_eq!(texts(&c, "select 1").await, vec![vec!["1"]]);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a login took {:?} beside 64 idle sockets",
            started.elapsed()
        );
    });
    // The idle ones are closed: the oldest to make room, the rest at the login timeout.
    let started = Instant::now();
    for raw in idle.iter_mut() {
        raw.s
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert!(raw.closed(), "an idle socket was not closed");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "idle sockets stayed open for {:?}",
        started.elapsed()
    );
}

#[test]
fn a_roles_statement_timeout_is_a_ceiling_a_session_cannot_lift() {
    let p = project_with(
        "analyst: { tables: [customers, sales] }",
        "analyst: { tables: [customers, sales], statement_timeout: 1500ms }",
    );
    let s = serve(&p);
    if have("psql", "--version") || !may_skip("psql") {
        let out = psql(
            s.port,
            "ann",
            "ann-pw-2025",
            "",
            "set statement_timeout = 0",
        );
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("statement_timeout stays at 1s 500ms"),
            "{}",
            stderr(&out)
        );
    }
    rt().block_on(async {
        let c = connect(s.port, "ann", "ann-pw-2025").await.unwrap();
        for lift in [
            "set statement_timeout = 0",
            "set statement_timeout = '1h'",
            "reset statement_timeout",
        ] {
            c.batch_execute(lift).await.unwrap();
            let started = Instant::now();
            let stream = endless_rows(&c).await;
            futures::pin_mut!(stream);
            let err = stream_error(&mut stream, lift).await;
            assert_eq!(code(&err), "57014", "{lift}: {err:?}");
            assert!(started.elapsed() < Duration::from_secs(5), "{lift}");
        }
        // Lowering it works.
        c.batch_execute("set statement_timeout = '200ms'")
            .await
            .unwrap();
        let started = Instant::now();
        let e = c
            .simple_query(
                "select count(*) from generate_series(1, 100000000) a, generate_series(1, 1000) b",
            )
            .await
            .unwrap_err();
        assert_eq!(code(&e), "57014");
        assert!(started.elapsed() < Duration::from_millis(1_400));
        // Another role keeps the server's limit and may lower it.
        let a = connect(s.port, "ada", "ada long password").await.unwrap();
        assert_eq!(texts(&a, "show statement_timeout").await.len(), 1);
    });
}
