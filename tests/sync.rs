//! Sync plumbing (issue 12), end to end as non-superuser roles: a developer
//! (`ihub_developer`) who owns the tables, a second developer, and a viewer.
//!
//! Mappers: every mode in both directions, several external values for one
//! local value, bad input, and a table mapper reading its table with the
//! rights of the role that uses it, never the extension owner's.

use pg_ihub_e2e::*;
use postgres::Client;

/// This test's roles and integration, and a connection as the developer.
struct Sync {
    hub: Hub,
    p: String,
    dev: Client,
}

fn setup() -> Sync {
    let mut hub = hub();
    let p = unique("sync");
    hub.exec(&format!(
        // One test at a time: concurrent GRANTs on one schema collide.
        "BEGIN; SELECT pg_advisory_xact_lock(84708471);
         CREATE ROLE {p}_dev LOGIN IN ROLE ihub_developer;
         CREATE ROLE {p}_dev2 LOGIN IN ROLE ihub_developer;
         CREATE ROLE {p}_viewer LOGIN IN ROLE ihub_viewer;
         GRANT CREATE ON SCHEMA public TO {p}_dev;
         COMMIT;"
    ));
    let mut dev = hub.cluster.connect_as(&format!("{p}_dev"), &hub.cluster.dbname);
    dev.batch_execute(&format!(
        "CREATE TABLE {p}_countries (code text PRIMARY KEY, name text);
         INSERT INTO {p}_countries VALUES ('DE', 'Germany'), ('FR', 'France'), ('nl', 'Netherlands'), ('NL', 'Nederland');
         SELECT ihub.create_integration('{p}');"
    ))
    .unwrap_or_else(|e| panic!("{}", describe(&e)));
    Sync { hub, p, dev }
}

impl Sync {
    fn connect(&self, who: &str) -> Client {
        self.hub.cluster.connect_as(&format!("{}_{who}", self.p), &self.hub.cluster.dbname)
    }

    fn text(&mut self, sql: &str) -> Option<String> {
        let sql = sql.replace("{p}", &self.p);
        self.dev.query_one(&sql, &[]).unwrap_or_else(|e| panic!("{sql}: {}", describe(&e))).get(0)
    }

    fn count(&mut self, sql: &str) -> i64 {
        let sql = sql.replace("{p}", &self.p);
        self.dev.query_one(&sql, &[]).unwrap_or_else(|e| panic!("{sql}: {}", describe(&e))).get(0)
    }

    fn exec(&mut self, sql: &str) {
        let sql = sql.replace("{p}", &self.p);
        self.dev.batch_execute(&sql).unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
    }

    fn error(&mut self, sql: &str) -> String {
        error_of(&mut self.dev, &sql.replace("{p}", &self.p))
    }

    fn import(&mut self, mapper: &str, value: &str) -> Option<String> {
        self.text(&format!("SELECT ihub.map_import('{{p}}', '{mapper}', '{value}')"))
    }

    fn export(&mut self, mapper: &str, value: &str) -> Option<String> {
        self.text(&format!("SELECT ihub.map_export('{{p}}', '{mapper}', '{value}')"))
    }

    /// Warnings logged for this integration that name `value`.
    fn warnings(&mut self, value: &str) -> i64 {
        self.count(&format!(
            "SELECT count(*) FROM ihub.logs WHERE integration = '{{p}}' AND level = 'warning' AND details->>'value' = '{value}'"
        ))
    }

    /// The items of a mapper as "external values -> local value (waiting for)".
    fn items(&mut self, mapper: &str) -> String {
        self.text(&format!(
            "SELECT coalesce(string_agg(coalesce(array_to_string(external_values, ','), '') || '->' || coalesce(local_value, '')
                                        || coalesce(' (' || waiting_for || ')', ''), '; ' ORDER BY id), '')
             FROM ihub.mapper_items WHERE integration = '{{p}}' AND mapper = '{mapper}'"
        ))
        .unwrap_or_default()
    }
}

#[test]
fn a_table_mapper_fills_what_it_can_on_import_and_fails_on_unknown_exports() {
    let mut s = setup();
    s.exec("SELECT ihub.create_mapper('{p}', 'country', 'table', '{p}_countries', 'code', on_import => 'auto', on_export => 'fail')");

    // auto: exactly one matching row fills the item, exactly or ignoring case.
    assert_eq!(s.import("country", "DE").as_deref(), Some("DE"));
    assert_eq!(s.import("country", "fr").as_deref(), Some("FR"));
    assert_eq!(s.import("country", "fr").as_deref(), Some("FR"), "the second time from the item");
    // 'Nl' matches two rows ignoring case, 'Deutschland' none: a person decides.
    assert_eq!(s.import("country", "Nl"), None);
    assert_eq!(s.import("country", "Deutschland"), None);
    assert_eq!(s.import("country", "Deutschland"), None);
    assert_eq!(s.items("country"), "DE->DE; fr->FR; Nl-> (local value); Deutschland-> (local value)");
    assert_eq!(s.warnings("Deutschland"), 1, "one warning, when the value is first seen");
    // NULL maps to NULL.
    assert_eq!(s.text("SELECT ihub.map_import('{p}', 'country', NULL)"), None);

    // A person answers: the waiting item is completed, not duplicated.
    s.exec("SELECT ihub.map_item('{p}', 'country', ARRAY['Deutschland', 'GER'], 'DE')");
    assert_eq!(s.import("country", "Deutschland").as_deref(), Some("DE"));
    assert_eq!(s.import("country", "GER").as_deref(), Some("DE"));
    assert_eq!(s.import("country", "DE").as_deref(), Some("DE"), "earlier values stay");
    assert_eq!(s.items("country"), "Deutschland,GER,DE->DE; fr->FR; Nl-> (local value)");

    // Export: the first value of the item; fail for a value with none.
    assert_eq!(s.export("country", "DE").as_deref(), Some("Deutschland"));
    assert_eq!(s.export("country", "FR").as_deref(), Some("fr"));
    let err = s.error("SELECT ihub.map_export('{p}', 'country', 'NL')");
    assert!(
        err.contains("mapper \"country\"")
            && err.contains("\"NL\"")
            && err.contains("HINT: Map it first: SELECT ihub.map_item("),
        "{err}"
    );
    assert_eq!(s.count("SELECT count(*) FROM ihub.mapper_items WHERE integration = '{p}' AND local_value = 'NL'"), 0);
}

#[test]
fn an_enum_mapper_waits_for_a_person_on_import_and_maps_values_to_themselves_on_export() {
    let mut s = setup();
    s.exec(
        "SELECT ihub.create_mapper('{p}', 'status', 'enum', local_values => ARRAY['open', 'won', 'lost'],
                                   on_import => 'manual', on_export => 'auto')",
    );
    // manual: even a value equal to a local value waits for a person.
    assert_eq!(s.import("status", "open"), None);
    assert_eq!(s.import("status", "Closed Won"), None);
    assert_eq!(s.import("status", "Closed Won"), None);
    assert_eq!(s.warnings("Closed Won"), 1);
    let message =
        s.text("SELECT message FROM ihub.logs WHERE integration = '{p}' AND details->>'value' = 'Closed Won'");
    assert!(message.as_deref().unwrap_or("").contains("\"Closed Won\""), "{message:?}");
    assert_eq!(
        s.count("SELECT count(*) FROM ihub.mapper_items WHERE integration = '{p}' AND waiting_for = 'local value'"),
        2
    );
    assert_eq!(s.count("SELECT waiting FROM ihub.mappers WHERE integration = '{p}' AND name = 'status'"), 2);

    // auto export: the value stands for itself until a person maps it.
    assert_eq!(s.export("status", "lost").as_deref(), Some("lost"));
    assert_eq!(s.import("status", "lost").as_deref(), Some("lost"));
    s.exec("SELECT ihub.map_item('{p}', 'status', ARRAY['Closed Won', 'closed_won'], 'won', external_id => '7')");
    assert_eq!(s.import("status", "Closed Won").as_deref(), Some("won"));
    assert_eq!(s.import("status", "closed_won").as_deref(), Some("won"));
    assert_eq!(s.export("status", "won").as_deref(), Some("Closed Won"));
    s.exec("SELECT ihub.map_item('{p}', 'status', ARRAY['Lost'], 'lost')");
    assert_eq!(s.export("status", "lost").as_deref(), Some("Lost"), "the value given last is exported");
    assert_eq!(s.import("status", "lost").as_deref(), Some("lost"), "and the earlier one still imports");
    assert_eq!(s.items("status"), "open-> (local value); Lost,lost->lost; Closed Won,closed_won->won");
    assert_eq!(
        s.text("SELECT external_id FROM ihub.mapper_items WHERE integration = '{p}' AND local_value = 'won'")
            .as_deref(),
        Some("7")
    );

    // Idempotent: the same call again changes nothing.
    let first = s.count("SELECT ihub.map_item('{p}', 'status', ARRAY['Closed Won', 'closed_won'], 'won')");
    let again = s.count("SELECT ihub.map_item('{p}', 'status', ARRAY['Closed Won', 'closed_won'], 'won')");
    assert_eq!(first, again);
    assert_eq!(s.items("status"), "open-> (local value); Lost,lost->lost; Closed Won,closed_won->won");

    // A value outside the enum is refused on export whatever the mode.
    let err = s.error("SELECT ihub.map_export('{p}', 'status', 'maybe')");
    assert!(err.contains("has no local value \"maybe\"") && err.contains("open, won, lost"), "{err}");
}

#[test]
fn manual_export_and_fail_import_leave_the_decision_to_a_person() {
    let mut s = setup();
    s.exec("SELECT ihub.create_mapper('{p}', 'tax', 'enum', on_import => 'fail', on_export => 'manual')");
    let err = s.error("SELECT ihub.map_import('{p}', 'tax', 'VAT21')");
    assert!(
        err.contains("mapper \"tax\"")
            && err.contains("\"VAT21\"")
            && err.contains(&format!(
                "HINT: Map it first: SELECT ihub.map_item('{}', 'tax', ARRAY['VAT21'], <local value>);",
                s.p
            )),
        "{err}"
    );
    assert_eq!(s.items("tax"), "", "fail creates nothing");

    assert_eq!(s.export("tax", "high"), None);
    assert_eq!(s.export("tax", "high"), None);
    assert_eq!(s.items("tax"), "->high (external value)");
    assert_eq!(s.warnings("high"), 1);
    s.exec("SELECT ihub.map_item('{p}', 'tax', ARRAY['VAT21'], 'high')");
    assert_eq!(s.export("tax", "high").as_deref(), Some("VAT21"));
    assert_eq!(s.import("tax", "VAT21").as_deref(), Some("high"));
    assert_eq!(s.items("tax"), "VAT21->high");

    // A mapping a person made is never moved silently.
    let err = s.error("SELECT ihub.map_item('{p}', 'tax', ARRAY['VAT9', 'VAT21'], 'low')");
    assert!(
        err.contains("external value \"VAT21\" of mapper \"tax\" already maps to \"high\"")
            && err.contains("delete_mapper_item"),
        "{err}"
    );
    assert_eq!(s.items("tax"), "VAT21->high", "nothing half-made");
    let item = s.count("SELECT id FROM ihub.mapper_items WHERE integration = '{p}' AND local_value = 'high'");
    s.exec(&format!("SELECT ihub.delete_mapper_item('{{p}}', 'tax', {item})"));
    s.exec("SELECT ihub.map_item('{p}', 'tax', ARRAY['VAT9', 'VAT21'], 'low')");
    assert_eq!(s.items("tax"), "VAT9,VAT21->low");
}

#[test]
fn bad_mapper_input_gets_clear_errors_and_leaves_nothing() {
    let mut s = setup();
    s.exec("SELECT ihub.create_mapper('{p}', 'status', 'enum', local_values => ARRAY['open', 'won'])");
    s.exec("SELECT ihub.create_mapper('{p}', 'country', 'table', '{p}_countries', 'code')");
    let cases = [
        ("SELECT ihub.create_mapper('{p}', 'bad name!', 'enum')", "invalid mapper name"),
        ("SELECT ihub.create_mapper('nope_{p}', 'x', 'enum')", "integration \"nope_"),
        ("SELECT ihub.create_mapper('{p}', 'x', 'list')", "unknown mapper kind \"list\""),
        ("SELECT ihub.create_mapper('{p}', 'x', 'enum', on_import => 'ask')", "unknown mapper mode \"ask\""),
        ("SELECT ihub.create_mapper('{p}', 'x', 'enum', on_export => NULL)", "unknown mapper mode"),
        ("SELECT ihub.create_mapper('{p}', 'x', 'table', '{p}_countries')", "needs a table and a column"),
        ("SELECT ihub.create_mapper('{p}', 'x', 'table', '{p}_countries', 'nope')", "column \"nope\" of"),
        (
            "SELECT ihub.create_mapper('{p}', 'x', 'table', '{p}_countries', 'code', local_values => '{a}')",
            "not from local_values",
        ),
        ("SELECT ihub.create_mapper('{p}', 'x', 'enum', '{p}_countries', 'code')", "an enum mapper has no table"),
        ("SELECT ihub.create_mapper('{p}', 'x', 'enum', local_values => '{a,a}')", "distinct, non-empty"),
        ("SELECT ihub.create_mapper('{p}', 'x', 'enum', local_values => '{}')", "distinct, non-empty"),
        ("SELECT ihub.create_mapper('{p}', 'status', 'enum')", "already has a mapper \"status\""),
        ("SELECT ihub.map_import('{p}', 'nope', 'a')", "has no mapper \"nope\""),
        ("SELECT ihub.map_item('{p}', 'status', '{}', 'open')", "one or more distinct, non-empty"),
        ("SELECT ihub.map_item('{p}', 'status', ARRAY['a', NULL], 'open')", "one or more distinct"),
        ("SELECT ihub.map_item('{p}', 'status', ARRAY['a', 'a'], 'open')", "one or more distinct"),
        ("SELECT ihub.map_item('{p}', 'status', ARRAY['a'], NULL)", "needs a local value"),
        ("SELECT ihub.map_item('{p}', 'status', ARRAY['a'], 'maybe')", "has no local value \"maybe\""),
        ("SELECT ihub.map_item('{p}', 'country', ARRAY['a'], 'XX')", "has code = \"XX\""),
        ("SELECT ihub.delete_mapper_item('{p}', 'status', -1)", "has no item -1"),
        ("SELECT ihub.drop_mapper('{p}', 'nope')", "has no mapper \"nope\""),
    ];
    for (sql, expected) in cases {
        let err = s.error(sql);
        assert!(err.contains(expected), "{sql}: {err}");
        assert!(!err.ends_with("HINT: "), "{sql}: no hint: {err}");
    }
    assert_eq!(s.count("SELECT count(*) FROM ihub.mappers WHERE integration = '{p}'"), 2);
    assert_eq!(s.count("SELECT count(*) FROM ihub.mapper_items WHERE integration = '{p}'"), 0);

    // A dropped table: a clear error at use, and the mapper can be dropped.
    s.exec("CREATE TABLE {p}_gone (code text); SELECT ihub.create_mapper('{p}', 'gone', 'table', '{p}_gone', 'code', on_import => 'auto')");
    s.exec("DROP TABLE {p}_gone");
    let err = s.error("SELECT ihub.map_import('{p}', 'gone', 'a')");
    assert!(err.contains("the table of mapper \"gone\" no longer exists") && err.contains("drop_mapper"), "{err}");
    s.exec("SELECT ihub.drop_mapper('{p}', 'gone')");

    // Deleting the integration takes its mappers along.
    s.exec("SELECT ihub.map_item('{p}', 'status', ARRAY['Open'], 'open'); SELECT ihub.delete_integration('{p}')");
    assert_eq!(s.count("SELECT count(*) FROM ihub.mappers WHERE integration = '{p}'"), 0);
    assert_eq!(s.count("SELECT count(*) FROM ihub.mapper_items WHERE integration = '{p}'"), 0);
}

/// A table mapper reads its table as the role that uses it: its column
/// privileges and row-level security apply, and code in a view runs as it.
#[test]
fn a_table_mapper_reads_with_the_rights_of_its_user() {
    let mut s = setup();
    let p = s.p.clone();
    s.exec(
        "CREATE TABLE {p}_who (cur name, super boolean);
         GRANT INSERT, SELECT ON {p}_who TO PUBLIC;
         CREATE FUNCTION {p}_note() RETURNS boolean LANGUAGE sql AS $$
             INSERT INTO public.{p}_who SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user RETURNING true $$;
         CREATE VIEW {p}_codes AS SELECT code FROM public.{p}_countries WHERE public.{p}_note();
         CREATE TABLE {p}_private (code text, owner name);
         INSERT INTO {p}_private VALUES ('MINE', current_user), ('THEIRS', 'someone');
         ALTER TABLE {p}_private ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON {p}_private USING (owner = current_user);
         GRANT SELECT ON {p}_private, {p}_codes TO {p}_dev2;
         SELECT ihub.create_mapper('{p}', 'country', 'table', '{p}_countries', 'code', on_import => 'auto');
         SELECT ihub.create_mapper('{p}', 'via_view', 'table', '{p}_codes', 'code', on_import => 'auto');
         SELECT ihub.create_mapper('{p}', 'private', 'table', '{p}_private', 'code', on_import => 'auto');",
    );
    let mut dev2 = s.connect("dev2");

    // No SELECT on the table: refused with a hint, nothing recorded.
    let err = error_of(&mut dev2, &format!("SELECT ihub.map_import('{p}', 'country', 'DE')"));
    assert!(err.contains("permission denied for column \"code\"") && err.contains("grant it SELECT"), "{err}");
    let err = error_of(&mut dev2, &format!("SELECT ihub.create_mapper('{p}', 'c2', 'table', '{p}_countries', 'code')"));
    assert!(err.contains("permission denied"), "{err}");
    let err = error_of(&mut dev2, &format!("SELECT ihub.map_item('{p}', 'country', ARRAY['x'], 'DE')"));
    assert!(err.contains("permission denied"), "{err}");
    assert_eq!(s.items("country"), "");

    // Row-level security applies to the role using the mapper.
    let mine: Option<String> =
        dev2.query_one(&format!("SELECT ihub.map_import('{p}', 'private', 'THEIRS')"), &[]).unwrap().get(0);
    assert_eq!(mine, None, "a row dev2 cannot see is not found for dev2");
    assert_eq!(s.import("private", "mine").as_deref(), Some("MINE"));

    // Code in a view runs as the role using the mapper, never as a superuser.
    let de: Option<String> =
        dev2.query_one(&format!("SELECT ihub.map_import('{p}', 'via_view', 'DE')"), &[]).unwrap().get(0);
    assert_eq!(de.as_deref(), Some("DE"));
    let ran_as = s.text("SELECT string_agg(DISTINCT cur || ':' || super, ',') FROM {p}_who");
    assert_eq!(ran_as, Some(format!("{p}_dev2:false")));

    // A viewer reads the items but cannot change them.
    let mut viewer = s.connect("viewer");
    let n: i64 = viewer
        .query_one(&format!("SELECT count(*) FROM ihub.mapper_items WHERE integration = '{p}'"), &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 3, "via_view: DE; private: THEIRS waiting, mine");
    let err = error_of(&mut viewer, &format!("SELECT ihub.map_import('{p}', 'country', 'DE')"));
    assert!(err.contains("permission denied for function map_import"), "{err}");
    // The internal halves cannot be called directly, with a forged role.
    let err = error_of(&mut viewer, &format!("SELECT ihub._map_import_by('{p}', 'country', 'DE', 'postgres')"));
    assert!(err.contains("permission denied"), "{err}");
    let err = error_of(&mut dev2, &format!("SELECT ihub._mapper_matches('{p}_countries'::regclass, 'code', 'DE', 10)"));
    assert!(err.contains("permission denied"), "{err}");
}
