//! The tests' S3 server as a process, for `.ci/run` (one shared server for the whole run):
//! the `s3s-fs` library over a directory, SigV4 signatures checked.
//!
//! ```sh
//! cargo run -p pixfarm-core --example test-s3-server -- --port 9000 \
//!     --access-key pixfarm-test --secret-key pixfarm-test-secret /tmp/s3
//! ```
//!
//! Runs until killed.

use pixfarm_core::testing::{S3Server, TEST_ACCESS_KEY, TEST_SECRET_KEY};

fn main() -> std::io::Result<()> {
    let mut port = 0u16;
    let mut access_key = TEST_ACCESS_KEY.to_string();
    let mut secret_key = TEST_SECRET_KEY.to_string();
    let mut root = None;
    let mut args = std::env::args().skip(1);
    let usage = "usage: test-s3-server [--port P] [--access-key K] [--secret-key S] ROOT";
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| std::io::Error::other(usage));
        match a.as_str() {
            "--port" => port = value()?.parse().map_err(std::io::Error::other)?,
            "--access-key" => access_key = value()?,
            "--secret-key" => secret_key = value()?,
            _ if !a.starts_with('-') && root.is_none() => root = Some(a),
            _ => return Err(std::io::Error::other(usage)),
        }
    }
    let root = std::path::PathBuf::from(root.ok_or_else(|| std::io::Error::other(usage))?);
    std::fs::create_dir_all(&root)?;
    let server = S3Server::serve_dir(&root, port, &access_key, &secret_key)?;
    println!("test S3 server on {}", server.endpoint());
    loop {
        std::thread::park();
    }
}
