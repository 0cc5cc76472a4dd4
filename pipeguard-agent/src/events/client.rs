//! A small client for `GET /v1/events`: HTTP/1.1 over a TCP socket, chunked transfer
//! decoding, one record per NDJSON line. Used by `pipeguard events` (and the tests).

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("endpoint {0:?}: expected http://HOST:PORT")]
    Endpoint(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the server answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("malformed response: {0}")]
    Protocol(String),
}

pub struct Request<'a> {
    /// `http://host:port`
    pub endpoint: &'a str,
    pub token: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub sse: bool,
}

/// `value` percent-encoded for a query string: everything but unreserved characters.
pub fn query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `host:port` of `http://host:port`.
fn authority(endpoint: &str) -> Result<&str, ClientError> {
    endpoint
        .strip_prefix("http://")
        .map(|a| a.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| ClientError::Endpoint(endpoint.to_string()))
}

/// One plain GET of `path` (HTTP/1.0: the body ends with the connection): the body of a
/// 200 answer.
pub async fn get(endpoint: &str, path: &str, token: Option<&str>) -> Result<String, ClientError> {
    let authority = authority(endpoint)?;
    let mut stream = TcpStream::connect(authority).await?;
    let mut head = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n");
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| ClientError::Protocol("no end of headers".into()))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(head.lines().next().unwrap_or_default().to_string()))?;
    if status != 200 {
        return Err(ClientError::Status {
            status,
            body: body.trim().to_string(),
        });
    }
    Ok(body.to_string())
}

/// Connects and calls `on_line` for every line of the stream until it ends (or `on_line`
/// returns false).
pub async fn follow(req: &Request<'_>, mut on_line: impl FnMut(&str) -> bool) -> Result<(), ClientError> {
    let authority = authority(req.endpoint)?;
    let mut stream = TcpStream::connect(authority).await?;
    let mut path = String::from("/v1/events");
    if let Some(ns) = req.namespace {
        path.push_str(&format!("?namespace={}", query_value(ns)));
    }
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    if let Some(token) = req.token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if req.sse {
        head.push_str("Accept: text/event-stream\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    let mut reader = BufReader::new(stream);

    let mut status_line = String::new();
    reader.read_line(&mut status_line).await?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(status_line.clone()))?;
    let mut chunked = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    if status != 200 {
        let mut body = String::new();
        let _ = reader.read_to_string(&mut body).await;
        return Err(ClientError::Status {
            status,
            body: body.trim().to_string(),
        });
    }
    let mut pending = String::new();
    loop {
        let data = if chunked {
            let mut size_line = String::new();
            if reader.read_line(&mut size_line).await? == 0 {
                break;
            }
            let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| ClientError::Protocol(format!("chunk size {size_line:?}")))?;
            if size == 0 {
                break;
            }
            let mut buf = vec![0u8; size + 2];
            reader.read_exact(&mut buf).await?;
            buf.truncate(size);
            buf
        } else {
            let mut buf = Vec::new();
            if reader.read_until(b'\n', &mut buf).await? == 0 {
                break;
            }
            buf
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(i) = pending.find('\n') {
            let line: String = pending.drain(..=i).collect();
            let line = line.trim_end();
            if !line.is_empty() && !on_line(line) {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(super::query_value("ci"), "ci");
        assert_eq!(
            super::query_value("a b&c=d/é\r\n"),
            "a%20b%26c%3Dd%2F%C3%A9%0D%0A"
        );
    }
}
