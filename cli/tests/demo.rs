//! `wsplice demo` as a user runs it: it prints where to go, serves the page through the
//! balancer, and a real WebSocket client sees the three backends answer in turn.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the demo on a free port and returns it with the address it printed.
fn start_demo() -> (Demo, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsplice"))
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let second = lines.next().unwrap().unwrap();
    let address = first
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no URL in {first:?}"))
        .to_string();
    (Demo(child), address, second)
}

#[test]
fn the_demo_prints_its_url_and_mode_serves_the_page_and_balances_websockets() {
    let (_demo, address, second) = start_demo();
    assert!(
        second.contains("data plane: sockmap") || second.contains("data plane: userspace"),
        "{second}"
    );

    let mut stream = TcpStream::connect(&address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).unwrap();
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(page.contains("served by <b>backend-"), "{page}");
    assert!(page.contains("new WebSocket("), "{page}");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answers: Vec<String> = runtime.block_on(async {
        let mut answers = Vec::new();
        for round in 0..3 {
            let (mut socket, response) =
                tokio_tungstenite::connect_async(format!("ws://{address}/ws"))
                    .await
                    .unwrap();
            assert_eq!(response.status(), 101);
            socket
                .send(Message::text(format!("hello {round}")))
                .await
                .unwrap();
            let reply = socket.next().await.unwrap().unwrap();
            answers.push(reply.into_text().unwrap().to_string());
            socket.close(None).await.unwrap();
        }
        answers
    });
    let mut backends: Vec<&str> = answers
        .iter()
        .map(|a| a.split(" (").next().unwrap())
        .collect();
    for (round, answer) in answers.iter().enumerate() {
        assert!(
            answer.ends_with(&format!("echoes: hello {round}")),
            "{answer}"
        );
    }
    backends.sort();
    assert_eq!(
        backends,
        vec!["backend-1", "backend-2", "backend-3"],
        "{answers:?}"
    );
}

#[test]
fn without_root_the_relay_carries_the_bytes_and_one_warning_says_why() {
    let binary = env!("CARGO_BIN_EXE_wsplice");
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mut command = if is_root {
        // Drop to nobody, as an unprivileged user would run it, from a copy nobody can reach
        // (the build directory may not be).
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("wsplice-nobody-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let copy = dir.join("wsplice");
        std::fs::copy(binary, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut setpriv = Command::new("setpriv");
        setpriv
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(copy);
        setpriv
    } else {
        Command::new(binary)
    };
    let mut child = command
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = stdout.next().unwrap().unwrap();
    let mode = stdout.next().unwrap().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let first_log = stderr.next().unwrap().unwrap();
    let _demo = Demo(child);
    assert!(url.contains("http://127.0.0.1:"), "{url}");
    assert!(mode.ends_with("data plane: userspace"), "{mode}");
    assert!(first_log.contains("WARN"), "{first_log}");
    assert!(
        first_log.contains("userspace relay, because not running as root"),
        "{first_log}"
    );
}
