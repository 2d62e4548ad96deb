//! The demo's CRM (see `pg_ihub_testkit::crm`): OAuth2, paginated contacts,
//! an events hook, and signed webhooks for edits made "by a person".
//! Prints a line per request it answers.
//!
//! Usage: ihub-crm <port> <webhook url> <webhook secret (whsec_…)> [token lifetime seconds]

use std::time::Duration;

use pg_ihub_testkit::crm::Crm;
use serde_json::json;

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(8473);
    let webhook = args.next().unwrap_or_else(|| "http://127.0.0.1:8472/webhooks/crm/contacts".into());
    let secret = args.next().unwrap_or_default();
    let lifetime = args.next().and_then(|s| s.parse().ok()).unwrap_or(30);
    let crm = Crm::start_on(port, Duration::from_secs(lifetime), 3);
    crm.send_webhooks_to(&webhook, &secret);
    let seed = [
        ("Ada Lovelace", "ada@example.com", "Closed Won", "gb"),
        ("Grace Hopper", "grace@example.com", "Open", "us"),
        ("Katherine Johnson", "katherine@example.com", "Open", "US"),
        ("Hedy Lamarr", "hedy@example.com", "Closed Lost", "at"),
        ("Emmy Noether", "emmy@example.com", "Closed Won", "de"),
        ("Rosalind Franklin", "rosalind@example.com", "Open", "gb"),
        ("Lise Meitner", "lise@example.com", "Open", "Atlantis"),
    ];
    crm.seed(
        &seed
            .iter()
            .map(|(name, email, status, country)| json!({"name": name, "email": email, "status": status, "country": country}))
            .collect::<Vec<_>>(),
    );
    println!("ihub-crm listening on {} ({} contacts)", crm.url("/"), seed.len());
    let mut seen = 0;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let requests = crm.requests();
        for r in requests.iter().skip(seen) {
            println!(
                "{} {} -> {}{}",
                r.method,
                r.path,
                r.status,
                if r.token.is_some() { " (bearer token)" } else { "" }
            );
        }
        seen = requests.len();
    }
}
