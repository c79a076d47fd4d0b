//! The server stays bounded whatever clients do (issue 21): half-sent headers and bodies time out, connections
//! beyond the limit get a 503, idle sockets do not pile up, and SIGTERM stops the server within the grace period
//! even with a half-sent request or a stream in progress. A real `trt-diff serve` with the stories260K engine.
use crate::common;
use common::http::{http, start_with};
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

/// Reads until the server closes the connection (or `limit` passes); returns what came and how long it took.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let t0 = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the server kept the connection open for {:?}: {e}",
                t0.elapsed()
            ),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), t0.elapsed())
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn sigterm(pid: u32) {
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// Waits for the child to exit within `limit`; returns how long it took.
fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "the server did not stop within {limit:?} of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn half_requests_time_out() {
    let d = tempfile::tempdir().unwrap();
    let plan = build_stories(d.path());
    let server = start_with(&plan, &["--header-timeout", "1", "--body-timeout", "1"]);
    let a = server.addr.as_str();
    let pid = server.child.id();
    assert_eq!(http(a, "GET", "/health", "").0, 200);
    let fds_before = open_fds(pid);

    // Half of a request line and headers: closed after the header timeout.
    let mut s = TcpStream::connect(a).unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        .unwrap();
    let (_, took) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(took < Duration::from_secs(5), "{took:?}");

    // A connection that sends nothing at all: closed too.
    let mut s = TcpStream::connect(a).unwrap();
    let (_, took) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(took < Duration::from_secs(5), "{took:?}");

    // Headers complete, body cut short: a 408 with a JSON error naming the flag, then the connection closes.
    let mut s = TcpStream::connect(a).unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": \"Once")
        .unwrap();
    let (resp, took) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("--body-timeout"), "{resp}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // Chunked body that never ends: the same.
    let mut s = TcpStream::connect(a).unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\n")
        .unwrap();
    let (resp, _) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");

    // 200 half-sent requests at once: all closed after the timeout, and the fds come back.
    let many: Vec<TcpStream> = (0..200)
        .map(|i| {
            let mut s = TcpStream::connect(a).unwrap();
            let _ = s.write_all(if i % 2 == 0 {
                b"GET /health HTTP/1.1\r\nHo".as_slice()
            } else {
                b"POST /v1/generate HTTP/1.1\r\nContent-Length: 50\r\n\r\n{".as_slice()
            });
            s
        })
        .collect();
    // Closed after the 1 s timeout; allow a loaded machine some time.
    let t0 = Instant::now();
    let mut fds_after = open_fds(pid);
    while fds_after > fds_before + 2 && t0.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(200));
        fds_after = open_fds(pid);
    }
    assert!(
        fds_after <= fds_before + 2,
        "fds before {fds_before}, after {fds_after}"
    );
    drop(many);
    // Still serving.
    let (code, body) = http(
        a,
        "POST",
        "/v1/completions",
        r#"{"prompt": "Once upon a time", "max_tokens": 5}"#,
    );
    assert_eq!(code, 200, "{body}");
}

#[test]
fn connections_over_the_limit_get_503() {
    let d = tempfile::tempdir().unwrap();
    let plan = build_stories(d.path());
    // A long header timeout, so the held connections stay open however slow the machine is.
    let server = start_with(&plan, &["--header-timeout", "60", "--max-connections", "8"]);
    let a = server.addr.as_str();
    let held: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(a).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut extra = TcpStream::connect(a).unwrap();
    let (resp, took) = read_until_closed(&mut extra, Duration::from_secs(10));
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.contains("too many open connections"), "{resp}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    drop(held);
    // Once they are closed, connections are served again.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(http(a, "GET", "/health", "").0, 200);
}

#[test]
fn sigterm_stops_within_the_grace_period_whatever_clients_do() {
    let d = tempfile::tempdir().unwrap();
    let plan = build_stories(d.path());
    // Long read timeouts, so only the grace period can end these connections.
    let args = [
        "--header-timeout",
        "600",
        "--body-timeout",
        "600",
        "--shutdown-grace",
        "2",
    ];

    // A half-sent body open.
    let mut server = start_with(&plan, &args);
    let a = server.addr.clone();
    let mut half = TcpStream::connect(&a).unwrap();
    half.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro",
    )
    .unwrap();
    let mut half_head = TcpStream::connect(&a).unwrap();
    half_head.write_all(b"POST /v1/comp").unwrap();
    let idle = TcpStream::connect(&a).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    sigterm(server.child.id());
    let took = wait_exit(&mut server.child, Duration::from_secs(6));
    assert!(took < Duration::from_secs(4), "{took:?}");
    drop((half, half_head, idle));

    // A long stream whose client does not read, plus requests queued behind it.
    let mut server = start_with(&plan, &args);
    let a = server.addr.clone();
    let body = r#"{"prompt": "Once upon a time", "max_tokens": 250, "stream": true}"#;
    let streams: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(&a).unwrap();
            write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    sigterm(server.child.id());
    let took = wait_exit(&mut server.child, Duration::from_secs(6));
    assert!(took < Duration::from_secs(4), "{took:?}");
    drop(streams);

    // Nothing open: stops at once.
    let mut server = start_with(&plan, &args);
    assert_eq!(http(&server.addr, "GET", "/health", "").0, 200);
    sigterm(server.child.id());
    let took = wait_exit(&mut server.child, Duration::from_secs(6));
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

#[test]
fn bad_limits_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let plan = d.path().join("none.plan");
    for (flag, value, needle) in [
        ("--header-timeout", "0", "--header-timeout"),
        ("--body-timeout", "-1", "--body-timeout"),
        ("--max-connections", "0", "--max-connections"),
        ("--shutdown-grace", "nan", "--shutdown-grace"),
    ] {
        let arg = format!("{flag}={value}");
        let r = run(&["serve", "--engine", s(&plan), &arg], false);
        assert!(r.stderr.contains(needle), "{flag} {value}: {}", r.stderr);
    }
}
