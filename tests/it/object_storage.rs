//! A warehouse and sources on S3: every demo pipeline (star schema and cubes) against an S3
//! server on loopback (moto, installed by `.ci/run`), compared with the same run on a local
//! warehouse; then `kbcrm query` and `kbcrm serve` reading it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStoreExt, PutPayload};

use crate::serve::{add_user_with_env, connect, rt, serve_with_env, texts};
use crate::support::{Project, have, may_skip, sample_data, stderr, stdout};

/// The secret key the test hands kbcrm; it must never appear in kbcrm's output.
const SECRET: &str = "s3-secret-never-printed-7f3a";

/// An S3 server on a free loopback port, killed on drop.
struct S3Server {
    child: Child,
    endpoint: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    fn start() -> Option<S3Server> {
        if !have("moto_server", "--help") {
            may_skip("moto_server (pip install 'moto[server]')");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let server = S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.request("GET", "/").is_none() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(server)
    }

    /// One plain HTTP request; the status line, or `None` when the server does not answer.
    fn request(&self, method: &str, path: &str) -> Option<String> {
        let addr = self.endpoint.trim_start_matches("http://");
        let mut stream = TcpStream::connect(addr).ok()?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        answer.lines().next().map(str::to_string)
    }

    fn create_bucket(&self, name: &str) {
        let status = self.request("PUT", &format!("/{name}")).expect("answer");
        assert!(status.contains(" 200"), "create bucket {name}: {status}");
    }

    /// kbcrm.yaml's `storage:` for this server, the credentials in environment variables.
    fn storage_yaml(&self) -> String {
        format!(
            "storage:\n  aws_endpoint: {}\n  aws_allow_http: \"true\"\n  aws_region: us-east-1\n  \
             aws_access_key_id_env: KBCRM_TEST_S3_KEY\n  \
             aws_secret_access_key_env: KBCRM_TEST_S3_SECRET\n",
            self.endpoint
        )
    }

    /// Copy a local folder's files to `bucket` under `prefix`.
    fn upload(&self, dir: &Path, bucket: &str, prefix: &str) {
        let store = AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_bucket_name(bucket)
            .with_access_key_id("kbcrm-test")
            .with_secret_access_key(SECRET)
            .build()
            .expect("S3 client");
        let mut files = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("list").flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    files.push(p);
                }
            }
        }
        rt().block_on(async {
            for f in files {
                let rel = f.strip_prefix(dir).expect("under dir").to_string_lossy();
                let key = object_store::path::Path::from(format!("{prefix}/{rel}"));
                let bytes = std::fs::read(&f).expect("read");
                store
                    .put(&key, PutPayload::from(bytes))
                    .await
                    .expect("upload");
            }
        });
    }
}

const ENV: &[(&str, &str)] = &[
    ("KBCRM_TEST_S3_KEY", "kbcrm-test"),
    ("KBCRM_TEST_S3_SECRET", SECRET),
];

/// Tables compared between the local and the S3 warehouse, with a checksum query each.
const CHECKS: &[&str] = &[
    "select count(*), count(distinct customer_id) from dim_customer",
    "select count(*), count(distinct customer_id) from map_customer_identity",
    "select count(*), sum(net_amount) from fact_sales",
    "select count(*) from fact_invoice",
    "select count(*) from fact_service_ticket",
    "select count(*) from quarantine",
    "select tier, count(*) from cube_loyalty group by tier order by tier",
    "select warning_level, count(*) from cube_churn_warning group by 1 order by 1",
];

/// The date every run of the S3 test is as of.
const AS_OF: &str = "2026-01-15";

#[test]
fn the_warehouse_and_sources_on_s3_give_the_local_results() {
    let Some(s3) = S3Server::start() else {
        return;
    };
    s3.create_bucket("kbcrm-wh");
    s3.create_bucket("kbcrm-src");
    s3.upload(&sample_data().join("sources"), "kbcrm-src", "sources");

    // The same project twice: local sources and warehouse, and everything on S3.
    // Every run is as of one date: a run that crosses midnight recomputes the cubes that read
    // `kbcrm_as_of()`, as it should, and would commit new versions.
    let local = Project::demo();
    local.ok(&["run", "--as-of", AS_OF]);

    let cloud = Project::demo();
    std::fs::remove_file(cloud.path().join("sources")).expect("unlink the local sources");
    for pipeline in ["erp", "sales", "service"] {
        let file = cloud.path().join(format!("pipelines/{pipeline}.yaml"));
        let text = std::fs::read_to_string(&file).expect("read");
        let moved = text.replace("location: sources/", "location: s3://kbcrm-src/sources/");
        assert_ne!(text, moved, "{pipeline} reads sources/");
        std::fs::write(&file, moved).expect("write");
    }
    let yaml = std::fs::read_to_string(cloud.path().join("kbcrm.yaml")).expect("read");
    let yaml = yaml.replace(
        "warehouse: warehouse/\n",
        &format!("warehouse: s3://kbcrm-wh/demo/\n{}", s3.storage_yaml()),
    );
    cloud.write("kbcrm.yaml", yaml);

    let run = cloud.kbcrm_with_env(&["run", "--as-of", AS_OF], ENV);
    let shown = format!("{}{}", stdout(&run), stderr(&run));
    assert!(run.status.success(), "run on S3 failed:\n{shown}");
    assert!(
        !shown.contains(SECRET),
        "the secret key was printed:\n{shown}"
    );
    assert!(
        !cloud.path().join("warehouse").exists(),
        "nothing is written to a local warehouse"
    );
    for sql in CHECKS {
        assert_eq!(
            cloud.query_with_env(sql, ENV),
            local.query(sql),
            "{sql}: S3 and local differ"
        );
    }

    // A Ballista cluster reads the S3 warehouse through the same stores.
    let mut on_cluster = ENV.to_vec();
    on_cluster.push(("KBCRM_ENGINE", "ballista"));
    let sql = "select count(*), sum(net_amount) from fact_sales";
    assert_eq!(cloud.query_with_env(sql, &on_cluster), local.query(sql));

    // Nothing new: a second run reads no file again and commits nothing.
    let tables = cloud.ok_with_env(&["tables"], ENV);
    cloud.ok_with_env(&["run", "--as-of", AS_OF], ENV);
    assert_eq!(
        versions(&cloud.ok_with_env(&["tables"], ENV)),
        versions(&tables),
        "a run without new files commits nothing"
    );

    // The SQL server reads the S3 warehouse.
    add_user_with_env(&cloud, "ada", "admin", "ada long password", ENV);
    let server = serve_with_env(&cloud, ENV);
    let served = rt().block_on(async {
        let client = connect(server.port, "ada", "ada long password")
            .await
            .expect("login");
        texts(&client, "select count(*), sum(net_amount) from fact_sales").await
    });
    assert_eq!(
        served,
        local.query("select count(*), sum(net_amount) from fact_sales")
    );
    drop(server);

    // A setting that would let two runs overwrite each other's commits is refused.
    let mut unsafe_env = ENV.to_vec();
    unsafe_env.push(("AWS_S3_ALLOW_UNSAFE_RENAME", "true"));
    let refused = cloud.kbcrm_with_env(&["run", "erp"], &unsafe_env);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("AWS_S3_ALLOW_UNSAFE_RENAME"),
        "{}",
        stderr(&refused)
    );
}

/// `(table, version)` of every line of `kbcrm tables`.
fn versions(tables: &str) -> Vec<(String, String)> {
    tables
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect()
}

#[test]
fn credentials_written_in_kbcrm_yaml_are_refused() {
    let p = Project::empty();
    p.write(
        "kbcrm.yaml",
        "name: t\nwarehouse: s3://bucket/wh/\nstorage:\n  aws_region: eu-central-1\n  \
         aws_secret_access_key: hunter2-in-yaml\n  aws_access_key_id_env: KBCRM_TEST_UNSET_VAR\n",
    );
    let out = p.kbcrm(&["validate"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("storage.aws_secret_access_key: credentials are not written in kbcrm.yaml"),
        "{err}"
    );
    assert!(err.contains("aws_secret_access_key_env: VARIABLE"), "{err}");
    assert!(
        err.contains("the environment variable KBCRM_TEST_UNSET_VAR is not set"),
        "{err}"
    );
    assert!(err.contains("kbcrm.yaml:5"), "the line is named: {err}");
    assert!(!err.contains("hunter2-in-yaml"), "{err}");
}
