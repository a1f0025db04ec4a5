//! Shared helpers: temporary projects, the generated sample data, running the binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use tempfile::TempDir;

/// The repository root (the demo project).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Scale of the shared sample data: about 1,000 customers.
pub const SCALE: f64 = 0.01;

/// Sample data generated once per test process (scale [`SCALE`], seed 7): its `sources/` and
/// `truth/` folders.
pub fn sample_data() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = TempDir::new().expect("temp dir");
        let out = run_in(
            dir.path(),
            &[
                "generate",
                "--scale",
                &SCALE.to_string(),
                "--seed",
                "7",
                "--out",
                "sources",
            ],
        );
        assert!(out.status.success(), "generate failed: {}", stderr(&out));
        dir
    })
    .path()
}

/// Run the kbcrm binary in `dir`.
pub fn run_in(dir: &Path, args: &[&str]) -> Output {
    run_with_env(dir, args, &[])
}

/// Run the kbcrm binary in `dir` with extra environment variables.
pub fn run_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kbcrm"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("KBCRM_WAREHOUSE")
        .env_remove("KBCRM_MEMORY_LIMIT")
        .env_remove("KBCRM_PROJECT")
        .env_remove("KBCRM_ROLLUPS")
        .env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("kbcrm runs")
}

/// Whether a test that needs an outside program may skip: on a laptop yes, under CI never.
pub fn may_skip(what: &str) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} is required under CI=true (.ci/run installs it)");
    }
    eprintln!("skipped: {what} is not available");
    true
}

/// Whether `program arg` runs and succeeds.
pub fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A project in a temporary folder.
pub struct Project {
    /// The folder.
    pub dir: TempDir,
}

impl Project {
    /// A copy of the repository's demo project (kbcrm.yaml, pipelines, SQL) reading the shared
    /// sample data.
    pub fn demo() -> Self {
        let p = Project::empty();
        copy_tree(&repo().join("pipelines"), &p.path().join("pipelines"));
        copy_tree(&repo().join("sql"), &p.path().join("sql"));
        std::fs::copy(repo().join("kbcrm.yaml"), p.path().join("kbcrm.yaml"))
            .expect("copy kbcrm.yaml");
        std::os::unix::fs::symlink(sample_data().join("sources"), p.path().join("sources"))
            .expect("link sources");
        p
    }

    /// The demo project reading its own sample data, generated into its `sources/` folder (so
    /// that a test can add batches to it).
    pub fn demo_with_own_data(scale: f64, seed: u64) -> Self {
        let p = Project::empty();
        copy_tree(&repo().join("pipelines"), &p.path().join("pipelines"));
        copy_tree(&repo().join("sql"), &p.path().join("sql"));
        std::fs::copy(repo().join("kbcrm.yaml"), p.path().join("kbcrm.yaml"))
            .expect("copy kbcrm.yaml");
        let out = p.kbcrm(&[
            "generate",
            "--scale",
            &scale.to_string(),
            "--seed",
            &seed.to_string(),
            "--out",
            "sources",
        ]);
        assert!(out.status.success(), "generate failed: {}", stderr(&out));
        p
    }

    /// A project with only `kbcrm.yaml` and empty `pipelines/` and `sql/` folders.
    pub fn empty() -> Self {
        let dir = TempDir::new().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("pipelines")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("sql")).expect("mkdir");
        std::fs::write(dir.path().join("kbcrm.yaml"), "name: test\n").expect("write");
        Project { dir }
    }

    /// A copy of the whole project (warehouse included) in another folder, as after moving it.
    pub fn copied(&self) -> Self {
        let dir = TempDir::new().expect("temp dir");
        copy_tree(self.path(), dir.path());
        Project { dir }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write a file (folders created).
    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, content).expect("write");
    }

    /// Run kbcrm in the project.
    pub fn kbcrm(&self, args: &[&str]) -> Output {
        run_in(self.path(), args)
    }

    /// Run kbcrm in the project with extra environment variables.
    pub fn kbcrm_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        run_with_env(self.path(), args, env)
    }

    /// Run kbcrm and require success.
    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_with_env(args, &[])
    }

    /// Run kbcrm with extra environment variables and require success.
    pub fn ok_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = run_with_env(self.path(), args, env);
        assert!(
            out.status.success(),
            "kbcrm {args:?} failed ({:?}):\n{}\n{}",
            out.status.code(),
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    /// Run kbcrm with extra environment variables and require exit code 2 with `want` in
    /// stderr, none of `never` (passwords), and the warehouse unchanged.
    pub fn fails_cleanly(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        want: &[&str],
        never: &[&str],
    ) {
        self.fails_cleanly_with(2, args, env, want, never);
    }

    /// As [`Project::fails_cleanly`], with exit code `code`.
    pub fn fails_cleanly_with(
        &self,
        code: i32,
        args: &[&str],
        env: &[(&str, &str)],
        want: &[&str],
        never: &[&str],
    ) {
        let before = self.warehouse_files();
        let out = run_with_env(self.path(), args, env);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{err}");
        for w in want {
            assert!(err.contains(w), "'{w}' not in: {err}");
        }
        for n in never {
            assert!(!err.contains(n), "'{n}' must not be shown: {err}");
        }
        assert_eq!(self.warehouse_files(), before, "nothing may be committed");
    }

    /// `kbcrm query --format csv` as rows of fields (header dropped).
    pub fn query(&self, sql: &str) -> Vec<Vec<String>> {
        self.query_with_env(sql, &[])
    }

    /// [`Project::query`] with extra environment variables.
    pub fn query_with_env(&self, sql: &str, env: &[(&str, &str)]) -> Vec<Vec<String>> {
        let out = self.ok_with_env(&["query", "--format", "csv", sql], env);
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_reader(out.as_bytes());
        reader
            .records()
            .map(|r| r.expect("csv row").iter().map(str::to_string).collect())
            .collect()
    }

    /// A single number from a query.
    pub fn scalar(&self, sql: &str) -> i64 {
        let rows = self.query(sql);
        rows[0][0]
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {rows:?}"))
    }

    /// Snapshot of the warehouse: every file path under it with its size, sorted; the run
    /// history (`_kbcrm/runs/`), which records every run, is left out.
    pub fn warehouse_files(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let root = self.path().join("warehouse");
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    // Run records and a failed run's kept rejects are not tables.
                    if !p.ends_with("_kbcrm/runs") && !p.ends_with("_kbcrm/rejects") {
                        stack.push(p);
                    }
                } else {
                    let rel = p
                        .strip_prefix(&root)
                        .expect("under root")
                        .to_string_lossy()
                        .into_owned();
                    out.push((rel, e.metadata().map(|m| m.len()).unwrap_or(0)));
                }
            }
        }
        out.sort();
        out
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let p = e.path();
        let dest = to.join(e.file_name());
        if p.is_dir() {
            copy_tree(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).expect("copy");
        }
    }
}

/// Rows of a truth CSV file as maps of column to value.
pub fn truth_csv(name: &str) -> Vec<std::collections::HashMap<String, String>> {
    let path = sample_data().join("truth").join(name);
    let mut reader =
        csv::Reader::from_path(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let headers = reader.headers().expect("headers").clone();
    reader
        .records()
        .map(|r| {
            let r = r.expect("row");
            headers
                .iter()
                .zip(r.iter())
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// Hold `warehouse/_kbcrm/run.lock` of the project at `root` as a running `kbcrm run` holds it
/// (an operating-system lock, the holder described in the file), until the file is dropped.
pub fn hold_run_lock(root: &Path) -> std::fs::File {
    let dir = root.join("warehouse/_kbcrm");
    std::fs::create_dir_all(&dir).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let path = dir.join("run.lock");
    std::fs::write(
        &path,
        format!(
            "{{\"pid\":{},\"host\":\"{host}\",\"started_at\":\"2026-01-01T00:00:00Z\"}}",
            std::process::id()
        ),
    )
    .unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.lock().unwrap();
    file
}
