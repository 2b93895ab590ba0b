//! Scraping `/metrics` in tests: a plain HTTP/1.1 GET over a TCP socket (no
//! HTTP client dependency) and a reader for the Prometheus text format that
//! is just strict enough to sum one metric's samples.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET http://{addr}{path}`; the body of a 200 reply.
pub async fn get(addr: SocketAddr, path: &str) -> Result<String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8(buf).context("reply is not UTF-8")?)
    };
    let reply = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .with_context(|| format!("GET {addr}{path} timed out"))??;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {addr}{path}: no HTTP header in the reply"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("GET {addr}{path}: {status}");
    }
    // axum answers small bodies with Content-Length, never chunked, for a
    // fully built String; still, refuse chunked rather than misparse it.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("GET {addr}{path}: chunked replies are not supported by this test client");
    }
    Ok(body.to_string())
}

/// One sample line of the text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample in a scrape (comments skipped).
pub fn parse(text: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("line {}: `{line}` is not a Prometheus sample", n + 1);
        let (name, labels, rest) = match line.find('{') {
            Some(open) => {
                let close = line.rfind('}').with_context(bad)?;
                (
                    &line[..open],
                    parse_labels(&line[open + 1..close]).with_context(bad)?,
                    &line[close + 1..],
                )
            }
            None => {
                let (name, rest) = line.split_once(' ').with_context(bad)?;
                (name, Vec::new(), rest)
            }
        };
        let value = rest.split_whitespace().next().with_context(bad)?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().with_context(bad)?,
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(out)
}

fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        out.push((key.trim().to_string(), value));
        rest = after[end + 1..].trim_start_matches(',').trim();
    }
    Some(out)
}

/// Sum of every sample named `name` whose labels include all of `labels`;
/// `None` when no sample matches (the series was never recorded).
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        .map(|s| s.value)
        .collect();
    (!hits.is_empty()).then(|| hits.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_escapes_and_sums() {
        let text = "# TYPE x counter\nx{lane=\"high:base\",worker=\"a\\\"b\"} 3\nx{lane=\"low:base\"} 4.5\ny 1e3\nz_bucket{le=\"+Inf\"} 7\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].label("worker"), Some("a\"b"));
        assert_eq!(sum(&s, "x", &[]), Some(7.5));
        assert_eq!(sum(&s, "x", &[("lane", "low:base")]), Some(4.5));
        assert_eq!(sum(&s, "y", &[]), Some(1000.0));
        assert_eq!(sum(&s, "nope", &[]), None);
        assert!(parse("x{a=\"1\" 2").is_err());
    }
}
