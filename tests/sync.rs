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

// ---------------------------------------------------------------------------
// Bindings
// ---------------------------------------------------------------------------

/// The bindings of one object type, as "local key=external id".
fn bindings(s: &mut Sync, object_type: &str) -> String {
    s.text(&format!(
        "SELECT coalesce(string_agg(local_key || '=' || external_id, ',' ORDER BY local_key), '')
         FROM ihub.bindings WHERE integration = '{{p}}' AND object_type = '{object_type}'"
    ))
    .unwrap_or_default()
}

#[test]
fn a_binding_links_a_row_to_an_external_object_and_goes_with_the_row() {
    let mut s = setup();
    s.exec(
        "CREATE TABLE {p}_contacts (id bigint PRIMARY KEY, name text);
         INSERT INTO {p}_contacts VALUES (1, 'Ada'), (2, 'Grace'), (3, 'Edsger');
         SELECT ihub.bind('{p}', 'contact', '{p}_contacts', '1', 'c_1', '{\"name\": \"Ada\"}');
         SELECT ihub.bind('{p}', 'contact', '{p}_contacts', '2', 'c_2');",
    );
    assert_eq!(s.text("SELECT ihub.external_id('{p}', 'contact', '1')").as_deref(), Some("c_1"));
    assert_eq!(s.text("SELECT ihub.local_key('{p}', 'contact', 'c_2')").as_deref(), Some("2"));
    assert_eq!(s.text("SELECT ihub.local_key('{p}', 'contact', 'c_9')"), None);
    let changed = |s: &mut Sync, key: &str, data: &str| -> bool {
        let sql = format!("SELECT ihub.has_changed('{}', 'contact', '{key}', '{data}')", s.p);
        s.dev.query_one(&sql, &[]).unwrap().get(0)
    };
    assert!(!changed(&mut s, "1", r#"{"name": "Ada"}"#), "the same data");
    assert!(!changed(&mut s, "1", r#"{ "name" :"Ada" }"#), "the same data, spelled otherwise");
    assert!(changed(&mut s, "1", r#"{"name": "Ada L."}"#));
    assert!(changed(&mut s, "2", r#"{"name": "Grace"}"#), "bound without data");
    assert!(changed(&mut s, "3", r#"{"name": "Edsger"}"#), "not bound");

    // Binding again moves the row to another id and data; one object is one row.
    s.exec("SELECT ihub.bind('{p}', 'contact', '{p}_contacts', '2', 'c_22', '{\"name\": \"Grace\"}')");
    assert_eq!(bindings(&mut s, "contact"), "1=c_1,2=c_22");
    let err = s.error("SELECT ihub.bind('{p}', 'contact', '{p}_contacts', '3', 'c_1')");
    assert!(err.contains("already bound to row 1") && err.contains("ihub.unbind"), "{err}");
    let err = s.error("SELECT ihub.bind('{p}', 'contact', '{p}_contacts', '99', 'c_99')");
    assert!(err.contains("no row of") && err.contains("id = 99"), "{err}");
    s.exec("CREATE TABLE {p}_other (id int PRIMARY KEY); INSERT INTO {p}_other VALUES (1); CREATE TABLE {p}_nokey (v text)");
    let err = s.error("SELECT ihub.bind('{p}', 'contact', '{p}_other', '1', 'o_1')");
    assert!(err.contains("is bound to rows of") && err.contains("one object type per table"), "{err}");
    let err = s.error("SELECT ihub.bind('{p}', 'thing', '{p}_nokey', 'x', 'x_1')");
    assert!(err.contains("has no single-column primary key"), "{err}");
    let err = s.error("SELECT ihub.bind('{p}', 'bad type!', '{p}_contacts', '1', 'x')");
    assert!(err.contains("invalid object type name"), "{err}");
    assert_eq!(bindings(&mut s, "contact"), "1=c_1,2=c_22", "nothing half-made");

    // Deleted rows take their bindings along, in their transaction.
    s.exec("BEGIN; DELETE FROM {p}_contacts WHERE id = 1; ROLLBACK");
    assert_eq!(bindings(&mut s, "contact"), "1=c_1,2=c_22", "a rolled-back delete keeps them");
    s.exec("DELETE FROM {p}_contacts WHERE id = 1");
    assert_eq!(bindings(&mut s, "contact"), "2=c_22");
    s.exec("SELECT ihub.bind('{p}', 'contact', '{p}_contacts', '3', 'c_3'); TRUNCATE {p}_contacts");
    assert_eq!(bindings(&mut s, "contact"), "");
    s.exec(
        "INSERT INTO {p}_contacts VALUES (4, 'Barbara');
         SELECT ihub.bind('{p}', 'contact', '{p}_contacts', '4', 'c_4');
         SELECT ihub.unbind('{p}', 'contact', '4');
         SELECT ihub.bind('{p}', 'contact', '{p}_contacts', '4', 'c_4');",
    );
    assert_eq!(bindings(&mut s, "contact"), "4=c_4");
    s.exec("DROP TABLE {p}_contacts");
    assert_eq!(bindings(&mut s, "contact"), "", "a dropped table's bindings go too");
}

#[test]
fn binding_takes_the_rights_of_the_role_that_binds() {
    let mut s = setup();
    let p = s.p.clone();
    s.exec(
        "CREATE TABLE {p}_accounts (id int PRIMARY KEY, owner name);
         INSERT INTO {p}_accounts VALUES (1, '{p}_dev2'), (2, 'someone else');
         ALTER TABLE {p}_accounts ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON {p}_accounts USING (owner = current_user);
         CREATE TABLE {p}_hidden (id int PRIMARY KEY); INSERT INTO {p}_hidden VALUES (1);
         GRANT SELECT ON {p}_accounts TO {p}_dev2;",
    );
    let mut dev2 = s.connect("dev2");
    // The first binding of a table installs its cleanup trigger: that takes TRIGGER.
    let err = error_of(&mut dev2, &format!("SELECT ihub.bind('{p}', 'account', '{p}_accounts', '1', 'a_1')"));
    assert!(err.contains("installs a trigger") && err.contains("GRANT TRIGGER"), "{err}");
    let err = error_of(&mut dev2, &format!("SELECT ihub.bind('{p}', 'hidden', '{p}_hidden', '1', 'h_1')"));
    assert!(err.contains("permission denied for table"), "{err}");
    // Once the owner has bound a row, dev2 binds what it can see, and only that.
    s.exec("SELECT ihub.bind('{p}', 'account', '{p}_accounts', '2', 'a_2')");
    dev2.batch_execute(&format!("SELECT ihub.bind('{p}', 'account', '{p}_accounts', '1', 'a_1')")).unwrap();
    s.exec("SELECT ihub.unbind('{p}', 'account', '2')");
    let err = error_of(&mut dev2, &format!("SELECT ihub.bind('{p}', 'account', '{p}_accounts', '2', 'a_2')"));
    assert!(err.contains("no row of"), "row-level security hides row 2 from dev2: {err}");
    assert_eq!(bindings(&mut s, "account"), "1=a_1");
    let bound_by = s.text("SELECT bound_by::text FROM ihub.bindings WHERE integration = '{p}' AND local_key = '1'");
    assert_eq!(bound_by, Some(format!("{p}_dev2")));

    // A viewer reads bindings and looks them up, and changes nothing.
    let mut viewer = s.connect("viewer");
    let id: Option<String> =
        viewer.query_one(&format!("SELECT ihub.external_id('{p}', 'account', '1')"), &[]).unwrap().get(0);
    assert_eq!(id.as_deref(), Some("a_1"));
    let err = error_of(&mut viewer, &format!("SELECT ihub.unbind('{p}', 'account', '1')"));
    assert!(err.contains("permission denied"), "{err}");
    let err = error_of(
        &mut viewer,
        &format!("SELECT ihub._bind_by('{p}', 'account', '{p}_accounts', '2', 'x', NULL, 'postgres')"),
    );
    assert!(err.contains("permission denied"), "{err}");
}

#[test]
fn upsert_creates_updates_or_leaves_alone_and_binds() {
    let mut s = setup();
    s.exec(
        "CREATE TABLE {p}_people (id bigserial PRIMARY KEY, name text NOT NULL, email text, score int DEFAULT 0);
         CREATE TABLE {p}_audit (what text, id bigint);
         -- Unqualified names: the caller's own search_path applies to its triggers.
         CREATE FUNCTION {p}_audit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO {p}_audit VALUES (TG_OP, NEW.id); RETURN NEW; END $$;
         CREATE TRIGGER audit AFTER INSERT OR UPDATE ON {p}_people FOR EACH ROW EXECUTE FUNCTION {p}_audit();",
    );
    let upsert = |s: &mut Sync, id: &str, data: &str| -> (String, String) {
        let sql = format!(
            "SELECT local_key, action FROM ihub.upsert('{}', 'person', '{}_people', '{id}', '{data}')",
            s.p, s.p
        );
        let row = s.dev.query_one(&sql, &[]).unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
        (row.get(0), row.get(1))
    };
    let (key, action) = upsert(&mut s, "p_1", r#"{"name": "Ada", "email": "ada@example.com"}"#);
    assert_eq!(action, "created");
    assert_eq!(
        s.text(&format!("SELECT name || ' ' || email || ' ' || score FROM {{p}}_people WHERE id = {key}")).as_deref(),
        Some("Ada ada@example.com 0")
    );
    assert_eq!(
        s.text("SELECT ihub.external_id('{p}', 'person', (SELECT id::text FROM {p}_people))").as_deref(),
        Some("p_1")
    );

    let (again, action) = upsert(&mut s, "p_1", r#"{"email": "ada@example.com", "name": "Ada"}"#);
    assert_eq!((again.as_str(), action.as_str()), (key.as_str(), "unchanged"));
    let (again, action) = upsert(&mut s, "p_1", r#"{"name": "Ada Lovelace", "score": 7}"#);
    assert_eq!((again.as_str(), action.as_str()), (key.as_str(), "updated"));
    assert_eq!(
        s.text(&format!("SELECT name || ' ' || email || ' ' || score FROM {{p}}_people WHERE id = {key}")).as_deref(),
        Some("Ada Lovelace ada@example.com 7"),
        "columns not in data stay"
    );
    assert_eq!(
        s.text("SELECT string_agg(what, ',' ORDER BY what) FROM {p}_audit").as_deref(),
        Some("INSERT,UPDATE"),
        "unchanged wrote nothing; the caller's trigger ran with its search_path"
    );

    let err = s.error(
        "SELECT * FROM ihub.upsert('{p}', 'person', '{p}_people', 'p_2', '{\"name\": \"Bo\", \"nickname\": \"b\"}')",
    );
    assert!(
        err.contains("has no column \"nickname\"") && err.contains("HINT: The keys of data are column names"),
        "{err}"
    );
    let err = s.error("SELECT * FROM ihub.upsert('{p}', 'person', '{p}_people', 'p_2', '[1]')");
    assert!(err.contains("data must be a JSON object"), "{err}");
    let err = s.error("SELECT * FROM ihub.upsert('{p}', 'person', '{p}_people', 'p_2', '{}')");
    assert!(err.contains("at least one column"), "{err}");
    let err = s.error("SELECT * FROM ihub.upsert('{p}', 'person', '{p}_people', 'p_2', '{\"email\": \"x\"}')");
    assert!(err.contains("null value in column \"name\""), "the table's own constraints apply: {err}");
    assert_eq!(s.count("SELECT count(*) FROM {p}_people"), 1, "nothing half-made");
    assert_eq!(bindings(&mut s, "person"), format!("{key}=p_1"));

    // The row was deleted here: its binding went, and the next import creates it again.
    s.exec(&format!("DELETE FROM {{p}}_people WHERE id = {key}"));
    let (new_key, action) = upsert(&mut s, "p_1", r#"{"name": "Ada Lovelace", "score": 7}"#);
    assert_eq!(action, "created");
    assert_ne!(new_key, key);
}

// ---------------------------------------------------------------------------
// Loop prevention
// ---------------------------------------------------------------------------

/// Changes a receiver got whose body mentions `marker`.
fn got(rx: &Receiver, marker: &str) -> usize {
    rx.received().iter().filter(|r| String::from_utf8_lossy(&r.body).contains(marker)).count()
}

/// Waits until `rx` got a change mentioning `marker`.
fn wait_got(rx: &Receiver, marker: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while got(rx, marker) == 0 {
        assert!(std::time::Instant::now() < deadline, "no change mentioning {marker} arrived");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A change written while syncing integration A reaches every other
/// integration's endpoints but never A's: from an inbound handler of A, a
/// job of A, and a transaction marked with ihub.syncing. The markers written
/// afterwards without the mark reach both: once A's receiver has one, it
/// would have had the earlier changes too.
#[test]
fn a_sync_is_not_sent_back_to_the_integration_it_came_from() {
    let mut s = setup();
    let p = s.p.clone();
    let (crm, shop) = (Receiver::start(), Receiver::start());
    s.exec(&format!(
        "CREATE TABLE {p}_contacts (id bigserial PRIMARY KEY, name text);
         SELECT ihub.create_integration('{p}_shop');
         SELECT ihub.create_endpoint('{p}', '{p}_crm_hook', '{crm}');
         SELECT ihub.create_endpoint('{p}_shop', '{p}_shop_hook', '{shop}');
         SELECT ihub.enable_integration('{p}'); SELECT ihub.enable_integration('{p}_shop');
         SELECT ihub.subscribe('{p}_contacts', '{p}_crm_hook');
         SELECT ihub.subscribe('{p}_contacts', '{p}_shop_hook');
         CREATE FUNCTION {p}_import(item ihub.inbound_items) RETURNS jsonb LANGUAGE sql AS $$
             SELECT to_jsonb(u) FROM ihub.upsert('{p}', 'contact', '{p}_contacts', item.payload->>'id', item.payload->'data') u $$;
         CREATE FUNCTION {p}_job(args jsonb) RETURNS void LANGUAGE sql AS $$
             INSERT INTO public.{p}_contacts (name) VALUES (args->>'name') $$;
         SELECT ihub.create_source('{p}', 'contacts', '{p}_import(ihub.inbound_items)', 'none');",
        crm = crm.url("/crm"),
        shop = shop.url("/shop")
    ));

    // An inbound webhook of the CRM, handled by a processor.
    s.exec(&format!(
        "SELECT ihub.receive('{p}', 'contacts', '{{}}', convert_to('{{\"id\": \"c_1\", \"data\": {{\"name\": \"from-crm-webhook\"}}}}', 'UTF8'))"
    ));
    wait_got(&shop, "from-crm-webhook");
    // A job of the CRM integration, run by a job worker.
    s.exec(&format!("SELECT ihub.enqueue('{p}_job(jsonb)', '{{\"name\": \"from-crm-job\"}}', integration => '{p}')"));
    wait_got(&shop, "from-crm-job");
    // A transaction of the developer's, marked by hand; then unmarked again.
    s.exec(&format!(
        "BEGIN; SELECT ihub.syncing('{p}'); INSERT INTO {p}_contacts (name) VALUES ('from-crm-by-hand');
         SELECT ihub.syncing('{p}', false); INSERT INTO {p}_contacts (name) VALUES ('after-unmarking'); COMMIT;
         BEGIN; SELECT ihub.syncing('{p}'); INSERT INTO {p}_contacts (name) VALUES ('marked-then-rolled-back'); ROLLBACK;
         INSERT INTO {p}_contacts (name) VALUES ('a-local-change');"
    ));
    wait_got(&shop, "a-local-change");
    wait_got(&crm, "a-local-change");
    for echo in ["from-crm-webhook", "from-crm-job", "from-crm-by-hand"] {
        assert_eq!(got(&crm, echo), 0, "{echo} was sent back to the CRM");
        assert_eq!(got(&shop, echo), 1, "{echo} reached the shop");
    }
    assert_eq!(got(&crm, "after-unmarking"), 1, "the mark ends when unset");
    assert_eq!(got(&shop, "marked-then-rolled-back") + got(&crm, "marked-then-rolled-back"), 0);
    assert_eq!(
        s.text("SELECT result->>'action' FROM ihub.inbound_items WHERE integration = '{p}'").as_deref(),
        Some("created")
    );

    // Nobody sets the mark by hand: it takes ihub.syncing, which checks.
    let err = s.error("SET LOCAL ihub.syncing = 'anything'");
    assert!(err.contains("permission denied to set parameter"), "{err}");
    let err = s.error("SELECT ihub.syncing('nope_{p}')");
    assert!(err.contains("does not exist"), "{err}");
    let mut viewer = s.connect("viewer");
    let err = error_of(&mut viewer, &format!("SELECT ihub.syncing('{p}')"));
    assert!(err.contains("permission denied for function syncing"), "{err}");
}

/// A developer cannot make the capture trigger's look-up run their code with
/// more rights than their own: with their own `=` operator first on the
/// search path, a marked transaction writes to a subscribed table, and the
/// operator, if anything ran it, would record who it ran as. The mark still
/// works.
#[test]
fn the_syncing_check_runs_no_code_of_the_writer_with_other_rights() {
    let mut s = setup();
    let p = s.p.clone();
    let (crm, shop) = (Receiver::start(), Receiver::start());
    s.hub.exec(&format!("CREATE SCHEMA {p}_trap AUTHORIZATION {p}_dev"));
    s.exec(&format!(
        "CREATE TABLE {p}_contacts (id bigserial PRIMARY KEY, name text);
         SELECT ihub.create_integration('{p}_shop');
         SELECT ihub.create_endpoint('{p}', '{p}_crm_hook', '{crm}');
         SELECT ihub.create_endpoint('{p}_shop', '{p}_shop_hook', '{shop}');
         SELECT ihub.enable_integration('{p}'); SELECT ihub.enable_integration('{p}_shop');
         SELECT ihub.subscribe('{p}_contacts', '{p}_crm_hook');
         SELECT ihub.subscribe('{p}_contacts', '{p}_shop_hook');
         CREATE TABLE {p}_trap.ran_as (who name);
         GRANT USAGE ON SCHEMA {p}_trap TO PUBLIC;
         GRANT INSERT ON {p}_trap.ran_as TO PUBLIC;
         CREATE FUNCTION {p}_trap.eq(a bigint, b bigint) RETURNS boolean LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO {p}_trap.ran_as VALUES (current_user); RETURN a OPERATOR(pg_catalog.=) b; END $$;
         CREATE OPERATOR {p}_trap.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = {p}_trap.eq);",
        crm = crm.url("/crm"),
        shop = shop.url("/shop")
    ));
    s.exec(&format!(
        "BEGIN; SET LOCAL search_path = {p}_trap, pg_catalog, public;
         SELECT ihub.syncing('{p}'); INSERT INTO public.{p}_contacts (name) VALUES ('from-crm-by-hand'); COMMIT;
         INSERT INTO {p}_contacts (name) VALUES ('a-local-change');"
    ));
    wait_got(&crm, "a-local-change");
    wait_got(&shop, "from-crm-by-hand");
    assert_eq!(got(&crm, "from-crm-by-hand"), 0, "the mark held");
    assert_eq!(
        s.text("SELECT string_agg(DISTINCT who::text, ',') FROM {p}_trap.ran_as WHERE who <> '{p}_dev'"),
        None,
        "the developer's operator ran with someone else's rights"
    );
}

// ---------------------------------------------------------------------------
// Custom fields
// ---------------------------------------------------------------------------

/// The value of `field` in the latest change `rx` got for `name`: Some(value)
/// when the payload has the key, None when it leaves it out.
fn field_of(rx: &Receiver, name: &str, field: &str) -> Option<serde_json::Value> {
    let change = rx.received().into_iter().rev().find(|r| r.json()["data"]["name"] == name).expect("a change");
    change.json()["data"].get(field).cloned()
}

#[test]
fn a_custom_field_is_a_column_that_only_its_integrations_get() {
    let mut s = setup();
    let p = s.p.clone();
    let (crm, shop) = (Receiver::start(), Receiver::start());
    s.exec(&format!(
        "CREATE TABLE {p}_people (id bigserial PRIMARY KEY, name text);
         SELECT ihub.create_integration('{p}_shop');
         SELECT ihub.create_endpoint('{p}', '{p}_crm_hook', '{crm}');
         SELECT ihub.create_endpoint('{p}_shop', '{p}_shop_hook', '{shop}');
         SELECT ihub.enable_integration('{p}'); SELECT ihub.enable_integration('{p}_shop');
         SELECT ihub.subscribe('{p}_people', '{p}_crm_hook');
         SELECT ihub.subscribe('{p}_people', '{p}_shop_hook');
         INSERT INTO {p}_people (name) VALUES ('before');",
        crm = crm.url("/crm"),
        shop = shop.url("/shop")
    ));
    wait_got(&crm, "before");
    wait_got(&shop, "before");
    // Added to a subscribed table with changes on their way: nothing is lost.
    s.exec(&format!(
        "INSERT INTO {p}_people (name) VALUES ('in-flight');
         SELECT ihub.add_custom_field('{p}_people', 'loyalty', 'selection', 'Loyalty', 'The tier the CRM gives',
                                      options => ARRAY['bronze', 'silver', 'gold'], export_to => ARRAY['{p}']);
         SELECT ihub.add_custom_field('{p}_people', 'crm_score', 'float', export_to => ARRAY['{p}']);
         SELECT ihub.add_custom_field('{p}_people', 'vip_since', 'date');
         INSERT INTO {p}_people (name, loyalty, crm_score, vip_since) VALUES ('after', 'gold', 0.5, '2026-01-02');"
    ));
    wait_got(&crm, "after");
    wait_got(&shop, "after");
    assert_eq!(got(&crm, "in-flight") + got(&shop, "in-flight"), 2);
    assert_eq!(field_of(&crm, "after", "loyalty"), Some(serde_json::json!("gold")));
    assert_eq!(field_of(&crm, "after", "crm_score"), Some(serde_json::json!(0.5)));
    assert_eq!(field_of(&shop, "after", "loyalty"), None, "the shop never sees the CRM's field");
    assert_eq!(field_of(&shop, "after", "crm_score"), None);
    assert_eq!(field_of(&crm, "after", "vip_since"), None, "exported to no integration");
    assert_eq!(field_of(&shop, "after", "name"), Some(serde_json::json!("after")));

    // A real column: typed, checked, commented, listed.
    let err = s.error("INSERT INTO {p}_people (name, loyalty) VALUES ('x', 'platinum')");
    assert!(err.contains("loyalty_options"), "{err}");
    assert_eq!(
        s.text("SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = '{p}_people'::regclass AND attname = 'vip_since'")
            .as_deref(),
        Some("date")
    );
    assert_eq!(
        s.text("SELECT col_description('{p}_people'::regclass, (SELECT attnum FROM pg_attribute WHERE attrelid = '{p}_people'::regclass AND attname = 'loyalty'))")
            .as_deref(),
        Some("Loyalty\nThe tier the CRM gives")
    );
    assert_eq!(
        s.text("SELECT string_agg(name || ':' || type || ':' || array_to_string(export_to, ','), ' ' ORDER BY name) FROM ihub.custom_fields WHERE target = '{p}_people'::regclass"),
        Some(format!("crm_score:float:{p} loyalty:selection:{p} vip_since:date:"))
    );

    // Dropped with ihub.drop_custom_field, or by hand: the registration goes too.
    s.exec("SELECT ihub.drop_custom_field('{p}_people', 'loyalty'); ALTER TABLE {p}_people DROP COLUMN vip_since");
    assert_eq!(s.count("SELECT count(*) FROM ihub.custom_fields WHERE target = '{p}_people'::regclass"), 1);
    assert_eq!(s.count("SELECT count(*) FROM pg_attribute WHERE attrelid = '{p}_people'::regclass AND attname = 'loyalty' AND NOT attisdropped"), 0);
    s.exec("INSERT INTO {p}_people (name, crm_score) VALUES ('later', 1)");
    wait_got(&shop, "later");
    wait_got(&crm, "later");
    assert_eq!(field_of(&crm, "later", "crm_score"), Some(serde_json::json!(1)));
    assert_eq!(field_of(&shop, "later", "crm_score"), None);
    s.exec("DROP TABLE {p}_people");
    assert_eq!(
        s.count("SELECT count(*) FROM ihub.custom_fields WHERE name = 'crm_score' AND created_by = '{p}_dev'"),
        0
    );
}

#[test]
fn bad_custom_field_input_gets_clear_errors_and_adds_no_column() {
    let mut s = setup();
    let p = s.p.clone();
    s.exec(
        "CREATE TABLE {p}_items (id int PRIMARY KEY, note text); CREATE VIEW {p}_items_v AS SELECT * FROM {p}_items;",
    );
    let cases = [
        ("SELECT ihub.add_custom_field('{p}_items', 'Bad-Name', 'text')", "invalid custom field name"),
        ("SELECT ihub.add_custom_field('{p}_items', 'note', 'text')", "already has a column \"note\""),
        ("SELECT ihub.add_custom_field('{p}_items', 'x', 'money')", "unknown custom field type \"money\""),
        ("SELECT ihub.add_custom_field('{p}_items', 'x', 'selection')", "a selection needs its options"),
        (
            "SELECT ihub.add_custom_field('{p}_items', 'x', 'selection', options => '{a,a}')",
            "a selection needs its options",
        ),
        ("SELECT ihub.add_custom_field('{p}_items', 'x', 'text', options => '{a}')", "only a selection has options"),
        ("SELECT ihub.add_custom_field('{p}_items', 'x', 'text', export_to => '{nope_{p}}')", "integration \"nope_"),
        ("SELECT ihub.add_custom_field('{p}_items_v', 'x', 'text')", "is not a table"),
        ("SELECT ihub.drop_custom_field('{p}_items', 'note')", "has no custom field \"note\""),
    ];
    for (sql, expected) in cases {
        let err = s.error(sql);
        assert!(err.contains(expected) && !err.ends_with("HINT: "), "{sql}: {err}");
    }
    // Another developer may not alter a table it does not own.
    s.exec("GRANT ALL ON {p}_items TO {p}_dev2");
    let mut dev2 = s.connect("dev2");
    let err = error_of(&mut dev2, &format!("SELECT ihub.add_custom_field('{p}_items', 'x', 'text')"));
    assert!(err.contains("must be owner of table") && err.contains(&format!("{p}_dev")), "{err}");
    s.exec("SELECT ihub.add_custom_field('{p}_items', 'x', 'text')");
    let err = error_of(&mut dev2, &format!("SELECT ihub.drop_custom_field('{p}_items', 'x')"));
    assert!(err.contains("must be owner of table"), "{err}");
    assert_eq!(
        s.text("SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = '{p}_items'::regclass AND attnum > 0 AND NOT attisdropped").as_deref(),
        Some("id,note,x"),
        "only the one good field was added"
    );
}

// ---------------------------------------------------------------------------
// test_connection
// ---------------------------------------------------------------------------

#[test]
fn test_connection_sends_one_signed_request_and_reports_it_without_secrets() {
    let mut s = setup();
    let p = s.p.clone();
    let (ok, failing) = (Receiver::start(), Receiver::start());
    failing.script(|_, _| Reply::status(503));
    s.exec(&format!(
        r#"SELECT ihub.create_endpoint('{p}', '{p}_ok', '{ok}', auth => '{{"type": "bearer", "token": "tok-{p}"}}');
           SELECT ihub.create_endpoint('{p}', '{p}_failing', '{failing}');
           SELECT ihub.create_endpoint('{p}', '{p}_closed', 'http://127.0.0.1:9/');"#,
        ok = ok.url("/hook"),
        failing = failing.url("/hook")
    ));
    let secret: String =
        s.hub.one(&format!("SELECT secret FROM ihub.endpoint_secrets WHERE endpoint = '{p}_ok' AND signing"));
    ok.expect_secret(&secret);
    let report = |s: &mut Sync, endpoint: &str| -> serde_json::Value {
        let sql = format!("SELECT ihub.test_connection('{endpoint}')::text");
        let row = s.dev.query_one(&sql, &[]).unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
        serde_json::from_str(row.get::<_, &str>(0)).expect("a JSON report")
    };

    // The integration is not even enabled: a probe goes anyway, and records nothing.
    let r = report(&mut s, &format!("{p}_ok"));
    assert_eq!(
        (r["ok"].clone(), r["status"].clone(), r["category"].clone()),
        (true.into(), 200.into(), "ok".into()),
        "{r}"
    );
    assert!(r["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{r}");
    let got = ok.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].signature_valid, Some(true), "signed with the endpoint's secret");
    assert_eq!(got[0].header("authorization"), Some(format!("Bearer tok-{p}").as_str()));
    assert_eq!(got[0].json()["type"], "ihub.test_connection");
    assert!(!r.to_string().contains(&format!("tok-{p}")) && !r.to_string().contains(&secret), "{r}");
    assert_eq!(s.count(&format!("SELECT count(*) FROM ihub.deliveries WHERE endpoint LIKE '{p}%'")), 0);

    let r = report(&mut s, &format!("{p}_failing"));
    assert_eq!((r["ok"].clone(), r["status"].clone()), (false.into(), 503.into()), "{r}");
    let r = report(&mut s, &format!("{p}_closed"));
    assert_eq!((r["ok"].clone(), r["status"].clone()), (false.into(), serde_json::Value::Null), "{r}");
    assert!(r["error"].as_str().is_some_and(|e| e.contains("could not connect")), "{r}");

    let err = s.error("SELECT ihub.test_connection('nope_{p}')");
    assert!(err.contains("endpoint \"nope_") && err.contains("HINT: Create it"), "{err}");
    let mut viewer = s.connect("viewer");
    let err = error_of(&mut viewer, &format!("SELECT ihub.test_connection('{p}_ok')"));
    assert!(err.contains("permission denied for function test_connection"), "{err}");
    assert_eq!(ok.count(), 1, "the refused call sent nothing");
}

/// An integration with bindings can be deleted, and its bindings go with
/// it (ihub.delete_integration failed on the foreign key before).
#[test]
fn deleting_an_integration_removes_its_bindings() {
    let mut s = setup();
    s.exec(
        "CREATE TABLE {p}_things (id bigserial PRIMARY KEY, name text);
         INSERT INTO {p}_things (name) VALUES ('a');
         SELECT ihub.bind('{p}', 'thing', '{p}_things', (SELECT id::text FROM {p}_things), 'x_1', '{\"name\": \"a\"}');",
    );
    assert_eq!(s.count("SELECT count(*) FROM ihub.bindings WHERE integration = '{p}'"), 1);
    s.exec("SELECT ihub.delete_integration('{p}')");
    assert_eq!(s.count("SELECT count(*) FROM ihub.bindings WHERE integration = '{p}'"), 0);
    assert_eq!(s.count("SELECT count(*) FROM ihub.integrations WHERE name = '{p}'"), 0);
}
