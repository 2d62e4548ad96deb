//! OAuth2 (issue 12), end to end against the test CRM's token endpoint and
//! API, as non-superuser roles: tokens fetched and refreshed before they
//! expire, a 401 answered by one refresh and one retry, rotated refresh
//! tokens kept, the client-credentials grant, the authorization-code
//! callback on the listener (and a bad state refused), failures reported by
//! health, secrets readable by ihub_admin only and never in a view, log,
//! attempt record or the server log.

use std::time::{Duration, Instant};

use pg_ihub_e2e::*;

/// A team whose integration `{p}` has the credential `crm` for `crm` and an
/// endpoint `{p}_api` using it, enabled.
fn setup(crm: &Crm, grant: &str, refresh_token: Option<&str>) -> (Team, IntegrationGuard) {
    let mut t = team("oa");
    let guard = t.delete_integration_at_end();
    let sql = crm_sql(crm, &t.p, "crm", &format!("{}_api", t.p), grant, refresh_token);
    t.exec(&format!("SELECT ihub.create_integration('{{p}}'); {sql} SELECT ihub.enable_integration('{{p}}');"));
    (t, guard)
}

fn status(t: &mut Team) -> String {
    t.one("SELECT status FROM ihub.oauth2_credentials WHERE integration = '{p}' AND name = 'crm'")
}

fn wait_status(t: &mut Team, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = status(t);
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "credential is {now}, not {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Posts a contact through the endpoint and waits for the delivery to end.
fn post_contact(t: &mut Team, name: &str) -> (String, i32) {
    let id: i64 =
        t.one(&format!("SELECT ihub.http_request('{{p}}_api', '{{\"name\": \"{name}\"}}', path => '/contacts')"));
    assert!(
        t.wait_true(
            &format!("SELECT state NOT IN ('pending', 'running', 'retry') FROM ihub.deliveries WHERE id = {id}"),
            Duration::from_secs(60)
        ),
        "delivery {id} did not end"
    );
    let row = t.dev.query_one(&format!("SELECT state, attempts FROM ihub.deliveries WHERE id = {id}"), &[]).unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn client_credentials_tokens_are_sent_and_renewed_before_they_expire() {
    let crm = Crm::start(Duration::from_secs(3), 10);
    let (mut t, _guard) = setup(&crm, "client_credentials", None);
    wait_status(&mut t, "valid");
    // Over three lifetimes of a token, every request goes through on its
    // first attempt: a new token is always there before the old expires.
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(9) {
        assert_eq!(post_contact(&mut t, &format!("c{n}")), ("done".into(), 1), "request {n}");
        n += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(crm.grants("client_credentials") >= 3, "tokens were renewed: {}", crm.grants("client_credentials"));
    assert_eq!(crm.requests().iter().filter(|r| r.status == 401).count(), 0, "no request was sent an expired token");
    assert_eq!(crm.contacts().len(), n);
    let tokens: Vec<Option<String>> =
        crm.requests().iter().filter(|r| r.path == "/contacts").map(|r| r.token.clone()).collect();
    assert!(tokens.iter().all(Option::is_some), "every request carried a bearer token");
}

#[test]
fn a_rotated_refresh_token_is_kept_and_used_next_time() {
    let crm = Crm::start(Duration::from_secs(3600), 10);
    let first = crm.issue_refresh_token();
    let (mut t, _guard) = setup(&crm, "refresh_token", Some(&first));
    wait_status(&mut t, "valid");
    assert!(!crm.refresh_token_valid(&first), "the CRM rotated it");
    let stored: String = t.su("SELECT refresh_token FROM ihub.oauth2_secrets WHERE integration = '{p}'");
    assert_ne!(stored, first);
    assert!(crm.refresh_token_valid(&stored), "the rotated token is the one kept");
    // Asked again (by hand): the kept token works, and is rotated again.
    t.exec("SELECT ihub.refresh_oauth2('{p}', 'crm')");
    assert!(t.wait_true(
        &format!("SELECT refresh_token <> '{stored}' FROM ihub.oauth2_secrets WHERE integration = '{{p}}'"),
        Duration::from_secs(30)
    ));
    assert_eq!(crm.grants("refresh_token"), 2);
    wait_status(&mut t, "valid");
    assert_eq!(post_contact(&mut t, "ada"), ("done".into(), 1));
}

#[test]
fn a_401_gets_one_refresh_and_one_retry() {
    let crm = Crm::start(Duration::from_secs(3600), 10);
    let (mut t, _guard) = setup(&crm, "client_credentials", None);
    wait_status(&mut t, "valid");
    assert_eq!(post_contact(&mut t, "before"), ("done".into(), 1));
    // The CRM forgets its tokens: the next request gets 401, pg_ihub asks
    // for a new token at once, and the retry with it goes through.
    crm.revoke_access_tokens();
    let grants = crm.grants("client_credentials");
    assert_eq!(post_contact(&mut t, "after-revoke"), ("done".into(), 2));
    assert_eq!(crm.grants("client_credentials"), grants + 1, "one refresh");
    // The token request after a 401 fails once (the token endpoint is busy):
    // the delivery waits for the next one instead of going again with the
    // refused token, and gets through with the new one.
    crm.revoke_access_tokens();
    crm.fail_next("/oauth/token", 503, 1);
    let (state, _) = post_contact(&mut t, "after-a-busy-token-endpoint");
    assert_eq!(state, "done");
    assert_eq!(crm.grants("client_credentials"), grants + 2);
    let refused = crm.requests().iter().filter(|r| r.path == "/contacts" && r.status == 401).count();
    assert_eq!(refused, 2, "one 401 per revoked token: the refused token was not sent again");

    // A 401 to the new token too is final, as any 4xx: no loop of refreshes,
    // and for a while no 401 asks for a new token.
    crm.fail_next("/contacts", 401, 3);
    let (state, attempts) = post_contact(&mut t, "refused");
    assert_eq!((state.as_str(), attempts), ("failed", 2));
    assert_eq!(crm.grants("client_credentials"), grants + 3);
    let (state, attempts) = post_contact(&mut t, "refused-again");
    assert_eq!((state.as_str(), attempts), ("failed", 1), "a 401 is final while the receiver refuses new tokens");
    assert_eq!(crm.grants("client_credentials"), grants + 3, "no token was asked for");
}

#[test]
fn the_authorization_code_callback_checks_the_state() {
    let crm = Crm::start(Duration::from_secs(3600), 10);
    let (mut t, _guard) = setup(&crm, "refresh_token", None);
    assert_eq!(status(&mut t), "not authorized");
    let health: String = t.su("SELECT status || ': ' || message FROM ihub.health() WHERE check_name = 'oauth2'");
    assert!(health.starts_with("warning") && health.contains("not authorized yet"), "{health}");
    // Not authorized: nothing is sent without a token.
    let (state, _) = post_contact(&mut t, "too-early");
    assert_eq!(state, "dead");
    let error: String = t.one("SELECT last_error FROM ihub.deliveries WHERE integration = '{p}'");
    assert!(error.contains("OAuth2 credential crm has no valid access token"), "{error}");
    assert_eq!(crm.requests().iter().filter(|r| r.path.starts_with("/contacts")).count(), 0);

    let listener = listener_url("");
    let client = reqwest::blocking::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let authorize = |t: &mut Team| -> String {
        let url: String = t.one(&format!("SELECT ihub.oauth2_authorize_url('{{p}}', 'crm', '{listener}')"));
        assert!(url.contains(&format!("client_id={}", crm::CLIENT_ID)), "{url}");
        // The person agrees at the CRM, which sends them back to the listener.
        let answer = client.get(&url).send().unwrap();
        assert_eq!(answer.status(), 302);
        answer.headers()["location"].to_str().unwrap().to_string()
    };
    let back = authorize(&mut t);
    assert!(back.starts_with(&format!("{listener}/oauth2/callback/{}/crm?code=", t.p)), "{back}");

    // A forged state is refused, and spoils nothing: anyone can send one.
    let forged = format!("{}/oauth2/callback/{}/crm?code=x&state=forged", listener, t.p);
    let answer = http().get(&forged).send().unwrap();
    assert_eq!(answer.status(), 400);
    assert!(answer.text().unwrap().contains("does not match"));
    assert_eq!(crm.grants("authorization_code"), 0);
    assert_eq!(
        t.one::<Option<String>>("SELECT last_error FROM ihub.oauth2_credentials WHERE integration = '{p}'"),
        None
    );

    // An expired state is refused, and recorded.
    t.hub.exec(&t.sql(
        "UPDATE ihub.oauth2_secret SET state_expires_at = now() - interval '1 second'
         WHERE oauth2_id = (SELECT id FROM ihub.oauth2_credentials WHERE integration = '{p}')",
    ));
    let answer = http().get(&back).send().unwrap();
    assert_eq!(answer.status(), 400);
    assert!(answer.text().unwrap().contains("expired"));
    let recorded: String = t.one("SELECT last_error FROM ihub.oauth2_credentials WHERE integration = '{p}'");
    assert!(recorded.contains("authorization refused") && recorded.contains("expired"), "{recorded}");

    // The real thing, after a forged one; then its state is used up.
    let back = authorize(&mut t);
    assert_eq!(http().get(&forged).send().unwrap().status(), 400);
    let answer = http().get(&back).send().unwrap();
    assert_eq!(answer.status(), 200);
    assert!(answer.text().unwrap().contains("Authorized"));
    assert_eq!(crm.grants("authorization_code"), 1);
    let again = http().get(&back).send().unwrap();
    assert_eq!(again.status(), 400);
    assert!(again.text().unwrap().contains("no authorization is under way"));
    wait_status(&mut t, "valid");
    assert_eq!(post_contact(&mut t, "authorized"), ("done".into(), 1));
    let health: String = t.su("SELECT status FROM ihub.health() WHERE check_name = 'oauth2'");
    assert_eq!(health, "ok");
}

#[test]
fn a_credential_that_cannot_be_refreshed_is_reported_and_its_secrets_stay_hidden() {
    let crm = Crm::start(Duration::from_secs(3600), 10);
    let mut t = team("oa");
    let _guard = t.delete_integration_at_end();
    // A wrong client secret, which the test looks for everywhere afterwards.
    let wrong = "wrong-secret-5d1c9e";
    t.exec(&format!(
        "SELECT ihub.create_integration('{{p}}');
         SELECT ihub.create_oauth2('{{p}}', 'crm', '{token}', '{id}', '{wrong}', \"grant\" => 'client_credentials');
         SELECT ihub.create_endpoint('{{p}}', '{{p}}_api', '{api}', auth => '{{\"type\": \"oauth2\", \"credential\": \"crm\"}}');
         SELECT ihub.enable_integration('{{p}}');",
        token = crm.url("/oauth/token"),
        id = crm::CLIENT_ID,
        api = crm.url(""),
    ));
    wait_status(&mut t, "failing");
    let error: String = t.one("SELECT last_error FROM ihub.oauth2_credentials WHERE integration = '{p}'");
    assert!(error.contains("HTTP 401") && error.contains("invalid_client"), "{error}");
    let health: String = t.su("SELECT status || ': ' || message FROM ihub.health() WHERE check_name = 'oauth2'");
    assert!(health.starts_with("critical") && health.contains(&format!("{}/crm", t.p)), "{health}");
    assert!(t.wait_true(
        "SELECT count(*) = 1 FROM ihub.logs WHERE integration = '{p}' AND level = 'error' AND message LIKE 'OAuth2 credential crm%'",
        Duration::from_secs(10)
    ));

    // Nobody but ihub_admin reads a secret.
    for who in ["dev", "viewer"] {
        let mut c = t.connect(who);
        let masked: String = c
            .query_one(&t.sql("SELECT client_secret FROM ihub.oauth2_credentials WHERE integration = '{p}'"), &[])
            .unwrap()
            .get(0);
        assert_eq!(masked, "********");
        let err = error_of(&mut c, "SELECT * FROM ihub.oauth2_secrets");
        assert!(err.contains("permission denied"), "{who}: {err}");
        let err = error_of(&mut c, "SELECT * FROM ihub.oauth2_secret");
        assert!(err.contains("permission denied"), "{who}: {err}");
    }
    let mut admin = t.connect("admin");
    let secret: String = admin
        .query_one(&t.sql("SELECT client_secret FROM ihub.oauth2_secrets WHERE integration = '{p}'"), &[])
        .unwrap()
        .get(0);
    assert_eq!(secret, wrong);

    // Fixed: the next request (asked for by hand here) works, health is ok.
    t.hub.exec(&t.sql(&format!(
        "UPDATE ihub.oauth2_secret SET client_secret = '{}' WHERE oauth2_id = (SELECT id FROM ihub.oauth2_credentials WHERE integration = '{{p}}')",
        crm::CLIENT_SECRET
    )));
    t.exec("SELECT ihub.refresh_oauth2('{p}', 'crm')");
    wait_status(&mut t, "valid");
    let (state, _) = post_contact(&mut t, "x");
    assert_eq!(state, "done");
    let token: String = t.su("SELECT access_token FROM ihub.oauth2_secrets WHERE integration = '{p}'");

    // No secret in views, logs, attempts or the server log.
    let seen: String = t.one(
        "SELECT concat_ws(' ', (SELECT string_agg(o::text, ' ') FROM ihub.oauth2_credentials o WHERE integration = '{p}'),
                               (SELECT string_agg(l::text, ' ') FROM ihub.logs l WHERE integration = '{p}'),
                               (SELECT string_agg(a::text, ' ') FROM ihub.delivery_attempts a JOIN ihub.deliveries d ON d.id = a.delivery_id
                                WHERE d.integration = '{p}'),
                               (SELECT string_agg(e::text, ' ') FROM ihub.endpoints e WHERE integration = '{p}'))",
    );
    let log = t.hub.cluster.log();
    for secret in [wrong, crm::CLIENT_SECRET, token.as_str()] {
        assert!(!seen.contains(secret), "a secret is visible: {seen}");
        assert!(!log.contains(secret), "a secret is in the server log");
    }
    assert!(seen.contains(r#"""authorization"": ""********"""#), "the credential header is shown masked: {seen}");
}

#[test]
fn test_connection_sends_the_access_token() {
    let crm = Crm::start(Duration::from_secs(3600), 10);
    let (mut t, _guard) = setup(&crm, "client_credentials", None);
    wait_status(&mut t, "valid");
    let report: serde_json::Value =
        serde_json::from_str(&t.one::<String>("SELECT ihub.test_connection('{p}_api')::text")).unwrap();
    // The CRM answers its root with 404, but only to an authorized request.
    assert_eq!(report["status"], 404, "{report}");
    let seen = crm.requests();
    let probe = seen.last().unwrap();
    assert!(probe.token.is_some(), "the probe carried the token");
    assert!(!report.to_string().contains(probe.token.as_deref().unwrap()));
}

#[test]
fn bad_oauth2_input_gets_clear_errors_and_leaves_nothing() {
    let crm = Crm::start(Duration::from_secs(3600), 10);
    let (mut t, _guard) = setup(&crm, "client_credentials", None);
    let create = |args: &str| {
        format!("SELECT ihub.create_oauth2('{{p}}', 'c2', '{}', 'id', 'secret' {args})", crm.url("/oauth/token"))
    };
    let cases = [
        (create(", \"grant\" => 'password'"), "unsupported OAuth2 grant", "client_credentials"),
        (create(", client_auth => 'jwt'"), "unsupported client authentication", "HTTP Basic"),
        (create(", refresh_token => ''"), "refresh_token must not be empty", "oauth2_authorize_url"),
        (create(", \"grant\" => 'client_credentials', refresh_token => 'rt'"), "takes no refresh token", "Leave"),
        (create(", authorize_url => 'javascript:x'"), "authorize_url must be an http", "authorization endpoint"),
        ("SELECT ihub.create_oauth2('{p}', 'c2', 'ftp://x/', 'id', 'secret')".to_string(), "invalid endpoint URL", "http"),
        ("SELECT ihub.create_oauth2('{p}', 'c2', 'http://127.0.0.1:9/t', '', 'secret')".to_string(), "must not be empty", "issued"),
        ("SELECT ihub.create_oauth2('{p}', 'crm', 'http://127.0.0.1:9/t', 'id', 's')".to_string(), "already exists", "drop_oauth2"),
        ("SELECT ihub.create_oauth2('{p}', 'bad name', 'http://127.0.0.1:9/t', 'id', 's')".to_string(), "invalid OAuth2 credential name", "letters"),
        (
            "SELECT ihub.create_endpoint('{p}', '{p}_other', 'http://127.0.0.1:9/', auth => '{\"type\": \"oauth2\", \"credential\": \"nope\"}')"
                .to_string(),
            "OAuth2 credential \"nope\"",
            "ihub.create_oauth2",
        ),
        ("SELECT ihub.drop_oauth2('{p}', 'crm')".to_string(), "is used by endpoint", "Delete those endpoints"),
        ("SELECT ihub.oauth2_authorize_url('{p}', 'crm', 'https://x')".to_string(), "client_credentials grant", "refresh_token grant"),
        ("SELECT ihub.refresh_oauth2('{p}', 'nope')".to_string(), "does not exist", "ihub.oauth2_credentials"),
    ];
    for (sql, message, hint) in &cases {
        let err = t.error(sql);
        assert!(err.contains(message) && err.contains(hint), "{sql}: {err}");
    }
    assert_eq!(t.one::<i64>("SELECT count(*) FROM ihub.oauth2_credentials WHERE integration = '{p}'"), 1);
    assert_eq!(t.one::<i64>("SELECT count(*) FROM ihub.endpoints WHERE integration = '{p}'"), 1);
    // A viewer configures nothing.
    let mut viewer = t.connect("viewer");
    let err = error_of(&mut viewer, &t.sql(&create("")));
    assert!(err.contains("permission denied for function create_oauth2"), "{err}");
    // The integration goes with its credentials.
    t.exec("SELECT ihub.disable_integration('{p}'); SELECT ihub.delete_integration('{p}');");
    assert_eq!(t.su::<i64>("SELECT count(*) FROM ihub.oauth2_secret s JOIN ihub.oauth2 o ON o.id = s.oauth2_id JOIN ihub.integration i ON i.id = o.integration_id WHERE i.name = '{p}'"), 0);
}
