//! The demo's webhook receiver: listens on 127.0.0.1:<port>, verifies
//! Standard Webhooks signatures with the secret(s) given on the command line,
//! answers 200 with its verdict ({"signature":"valid"}), and prints a line
//! per request.
//!
//! Usage: ihub-receiver <port> [whsec_... ...]

use std::time::Duration;

use pg_ihub_testkit::receiver::Receiver;

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(8471);
    let receiver = Receiver::start_on(port, 1, true);
    for secret in args {
        receiver.expect_secret(&secret);
    }
    println!("ihub-receiver listening on {}", receiver.url("/"));
    let mut seen = 0;
    loop {
        receiver.wait_for(seen + 1, Duration::from_secs(3600));
        for r in receiver.received().into_iter().skip(seen) {
            let verdict = match r.signature_valid {
                Some(true) => "signature valid",
                Some(false) => "signature INVALID",
                None => "signature not checked",
            };
            println!("{} {} webhook-id={} {}", r.method, r.path, r.header("webhook-id").unwrap_or("-"), verdict);
            seen += 1;
        }
    }
}
