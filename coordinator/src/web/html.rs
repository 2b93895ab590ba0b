//! HTML building blocks: escaping, the page layout, the progress bar.

use axum::response::Html;
use pixfarm_core::{JobCounts, JobRecord, JobState};

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query value.
pub fn url_enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Who is signed in, for the header (name, tenant, role, CSRF token for the logout form).
pub struct Who<'a> {
    pub name: &'a str,
    pub tenant: &'a str,
    pub role: &'a str,
    pub csrf: &'a str,
}

/// A whole page: no inline script or style (the CSP forbids them).
pub fn page(title: &str, who: Option<&Who<'_>>, body: &str) -> Html<String> {
    let user = match who {
        Some(w) => format!(
            "<span class=\"who\">{} · tenant {} · {}</span>\
             <form method=\"post\" action=\"/logout\" class=\"inline\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\"><button>Sign out</button></form>",
            esc(w.name),
            esc(w.tenant),
            esc(w.role),
            esc(w.csrf)
        ),
        None => String::new(),
    };
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · pixfarm</title><link rel=\"stylesheet\" href=\"/assets/app.css\">\
         <script src=\"/assets/app.js\" defer></script></head><body>\
         <header><a class=\"brand\" href=\"/jobs\">pixfarm</a> <a href=\"/jobs\">Jobs</a> \
         <a href=\"/workers\">Workers</a> {user}</header><main>{body}</main></body></html>",
        esc(title)
    ))
}

/// A stacked bar: succeeded, failed and canceled of total (SVG attributes, not inline style).
pub fn progress_bar(c: &JobCounts) -> String {
    let total = c.total.max(1) as f64;
    let w = |n: u64| (n as f64 / total * 1000.0).round() as u64;
    let (ok, failed, canceled) = (w(c.succeeded), w(c.failed), w(c.canceled));
    format!(
        "<svg class=\"bar\" viewBox=\"0 0 1000 10\" preserveAspectRatio=\"none\" role=\"img\" \
         aria-label=\"{} done, {} failed, {} canceled of {}\">\
         <rect class=\"bg\" x=\"0\" y=\"0\" width=\"1000\" height=\"10\"/>\
         <rect class=\"ok\" x=\"0\" y=\"0\" width=\"{ok}\" height=\"10\"/>\
         <rect class=\"failed\" x=\"{ok}\" y=\"0\" width=\"{failed}\" height=\"10\"/>\
         <rect class=\"canceled\" x=\"{}\" y=\"0\" width=\"{canceled}\" height=\"10\"/></svg>\
         <span class=\"counts\">{}/{} done{}{}</span>",
        c.succeeded,
        c.failed,
        c.canceled,
        c.total,
        ok + failed,
        c.succeeded,
        c.total,
        if c.failed > 0 {
            format!(", {} failed", c.failed)
        } else {
            String::new()
        },
        if c.canceled > 0 {
            format!(", {} canceled", c.canceled)
        } else {
            String::new()
        },
    )
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02} UTC")
}

/// Images per second of a job so far (or over its whole run once finished).
pub fn throughput(rec: &JobRecord, now_ms: u64) -> Option<f64> {
    let start = rec.started_ms?;
    let end = rec.finished_ms.unwrap_or(now_ms);
    let secs = end.saturating_sub(start) as f64 / 1000.0;
    (secs > 0.0 && rec.counts.succeeded > 0).then(|| rec.counts.succeeded as f64 / secs)
}

/// `key=value` labels as small tags.
pub fn labels(rec: &JobRecord) -> String {
    rec.labels
        .iter()
        .map(|(k, v)| format!("<span class=\"label\">{}={}</span>", esc(k), esc(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A job state as CSS class and display text: `running`.
pub fn state(s: JobState) -> String {
    s.as_str().to_ascii_lowercase()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<script>alert(\"x\")</script>&'"),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
    }

    #[test]
    fn formats_utc_time() {
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(time(1_764_547_200_000), "2025-12-01 00:00:00 UTC");
    }
}
