//! Raw rows: from a decoded event to the row it becomes (one shape for every raw table), and
//! the statements that write a batch's rows: `COPY` ([`copy`]), and the insert that keeps
//! only keys not stored yet ([`insert_tables`]), for a batch holding one stored before.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::Value;
use shared::events::{Envelope, EventType, Payload, MAX_NAME_LEN};
use sqlx::PgConnection;
use uuid::Uuid;

/// The raw tables of a tenant schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RawTable {
    CommandExecutions,
    AgentInteractions,
    ToolExecutions,
    SessionEvents,
    ProductivityMetrics,
    MetricSamples,
}

impl RawTable {
    pub const ALL: [RawTable; 6] = [
        RawTable::CommandExecutions,
        RawTable::AgentInteractions,
        RawTable::ToolExecutions,
        RawTable::SessionEvents,
        RawTable::ProductivityMetrics,
        RawTable::MetricSamples,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            RawTable::CommandExecutions => "command_executions",
            RawTable::AgentInteractions => "agent_interactions",
            RawTable::ToolExecutions => "tool_executions",
            RawTable::SessionEvents => "session_events",
            RawTable::ProductivityMetrics => "productivity_metrics",
            RawTable::MetricSamples => "metric_samples",
        }
    }

    /// The event type of a row of this table, as [`RawRow::from_event`] gave it (session
    /// events are told apart by their name).
    pub fn event_type(self, name: &str) -> &'static str {
        let t = match self {
            RawTable::CommandExecutions => EventType::CommandExecuted,
            RawTable::AgentInteractions => EventType::AgentInteracted,
            RawTable::ToolExecutions => EventType::ToolExecuted,
            RawTable::SessionEvents => match name {
                "started" => EventType::SessionStarted,
                "ended" => EventType::SessionEnded,
                _ => EventType::SessionContext,
            },
            RawTable::ProductivityMetrics => EventType::ProductivityRecorded,
            RawTable::MetricSamples => EventType::MetricSample,
        };
        t.as_str()
    }

    /// Whether a row of this table with this `status` is an error: commands, agent
    /// interactions and tools whose status is not `success`.
    pub fn is_error(self, status: &str) -> bool {
        matches!(
            self,
            RawTable::CommandExecutions | RawTable::AgentInteractions | RawTable::ToolExecutions
        ) && status != "success"
    }
}

/// One row of a raw table, borrowing its event's payload.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRow<'a> {
    pub table: RawTable,
    pub event_type: &'static str,
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub user_id: &'a str,
    pub team_id: &'a str,
    pub project_id: &'a str,
    pub session_id: &'a str,
    pub name: &'a str,
    pub status: &'a str,
    pub is_error: bool,
    pub duration_ms: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub value: f64,
    pub data: Cow<'a, Value>,
}

/// An optional dimension as stored: empty when absent.
pub(super) fn s(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or_default()
}

impl<'a> RawRow<'a> {
    /// Maps a metric event and its decoded payload to its row (`None` for auth events, which
    /// go to the audit log instead, and for source-control events).
    pub fn from_event(env: &'a Envelope, payload: &'a Payload) -> Option<RawRow<'a>> {
        let mut row = RawRow {
            table: RawTable::MetricSamples,
            event_type: env.event_type.as_str(),
            event_id: env.id,
            // Whole microseconds, as PostgreSQL stores them: `COPY`'s text and the insert's
            // binary values then name the same instant whatever the nanoseconds were.
            occurred_at: env.occurred_at.trunc_subsecs(6),
            received_at: env.received_at.trunc_subsecs(6),
            user_id: "",
            team_id: "",
            project_id: "",
            session_id: "",
            name: "",
            status: "",
            is_error: false,
            duration_ms: 0,
            input_tokens: 0,
            output_tokens: 0,
            value: 0.0,
            // Events of an older schema version are stored as upcast (current form).
            data: if env.schema_version < env.event_type.current_version() {
                Cow::Owned(payload.to_value())
            } else {
                Cow::Borrowed(&env.data)
            },
        };
        match payload {
            Payload::CommandExecuted(p) => {
                row.table = RawTable::CommandExecutions;
                row.user_id = &p.user_id;
                row.team_id = s(&p.team_id);
                row.project_id = s(&p.project_id);
                row.session_id = s(&p.session_id);
                row.name = &p.command_name;
                row.status = p.status.as_str();
                row.duration_ms = p.duration_ms;
            }
            Payload::AgentInteracted(p) => {
                row.table = RawTable::AgentInteractions;
                row.user_id = &p.user_id;
                row.team_id = s(&p.team_id);
                row.project_id = s(&p.project_id);
                row.session_id = s(&p.session_id);
                row.name = &p.agent_name;
                row.status = p.status.as_str();
                row.duration_ms = p.duration_ms;
                row.input_tokens = p.input_tokens;
                row.output_tokens = p.output_tokens;
                // Rollups sum `value`: for agent interactions, their cost.
                row.value = p.cost_usd.unwrap_or(0.0);
            }
            Payload::ToolExecuted(p) => {
                row.table = RawTable::ToolExecutions;
                row.user_id = &p.user_id;
                row.team_id = s(&p.team_id);
                row.project_id = s(&p.project_id);
                row.session_id = &p.session_id;
                row.name = &p.tool_name;
                row.status = if p.success { "success" } else { "error" };
                row.duration_ms = p.duration_ms;
            }
            Payload::SessionStarted(p) => {
                row.table = RawTable::SessionEvents;
                row.user_id = &p.user_id;
                row.team_id = s(&p.team_id);
                row.project_id = s(&p.project_id);
                row.session_id = &p.session_id;
                row.name = "started";
            }
            Payload::SessionEnded(p) => {
                row.table = RawTable::SessionEvents;
                row.user_id = &p.user_id;
                row.team_id = s(&p.team_id);
                row.project_id = s(&p.project_id);
                row.session_id = &p.session_id;
                row.name = "ended";
                row.value = p.productivity_score.unwrap_or(0.0);
            }
            Payload::SessionContext(p) => {
                row.table = RawTable::SessionEvents;
                row.user_id = &p.user_id;
                row.team_id = s(&p.team_id);
                row.project_id = s(&p.project_id);
                row.session_id = &p.session_id;
                row.name = "context";
            }
            Payload::ProductivityRecorded(p) => {
                row.table = RawTable::ProductivityMetrics;
                row.user_id = s(&p.user_id);
                row.team_id = s(&p.team_id);
                row.project_id = s(&p.project_id);
                row.name = p.metric_type.as_str();
                row.value = p.value;
            }
            Payload::MetricSample(p) => {
                row.table = RawTable::MetricSamples;
                row.name = &p.name;
                row.value = p.value;
                // Standard attribute names (OTel, Claude Code) fill the usual dimensions, as
                // names: a label's value may be longer (`MAX_LABEL_VALUE_LEN`), an id of the
                // other events may not, and every read shows ids.
                let label = |keys: &[&str]| {
                    keys.iter()
                        .find_map(|k| p.labels.get(*k))
                        .map_or("", |v| name_of(v))
                };
                row.user_id = label(&["user_id", "user.id"]);
                row.team_id = label(&["team_id", "team.id"]);
                row.project_id = label(&["project_id", "project.id"]);
                row.session_id = label(&["session_id", "session.id"]);
            }
            // Auth events go to the audit log, source-control events to their own tables.
            Payload::Auth(..) | Payload::PullRequestChanged(_) | Payload::BranchPushed(_) => {
                return None
            }
        }
        // What a rebuild reads back from the stored row must say the same (see
        // `rollups::rebuild`).
        row.is_error = row.table.is_error(row.status);
        debug_assert_eq!(row.event_type, row.table.event_type(row.name));
        Some(row)
    }
}

/// `INSERT` of raw rows from parallel arrays, ignoring keys (event id and time) already
/// stored, returning the ordinals (`feed_ord`) of the rows that were really inserted. Every
/// row gets the live feed's position: the batch's `feed_seq` (`$16`) and its own ordinal
/// (`$15`). Expanded at compile time per table, so every statement is a `&'static str`.
macro_rules! insert_sql {
    ($table:literal) => {
        concat!(
            "INSERT INTO ",
            $table,
            " (event_id, occurred_at, received_at, user_id, team_id, project_id, session_id,
               name, status, duration_ms, input_tokens, output_tokens, value, data, feed_ord,
               feed_seq)
             SELECT *, $16::bigint
               FROM UNNEST($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::text[],
                           $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],
                           $10::bigint[], $11::bigint[], $12::bigint[], $13::float8[],
                           $14::jsonb[], $15::int[])
             ON CONFLICT DO NOTHING
             RETURNING feed_ord"
        )
    };
}

/// One static statement per table; the table is chosen from a closed set, not formatted.
fn insert_sql(table: RawTable) -> &'static str {
    match table {
        RawTable::CommandExecutions => insert_sql!("command_executions"),
        RawTable::AgentInteractions => insert_sql!("agent_interactions"),
        RawTable::ToolExecutions => insert_sql!("tool_executions"),
        RawTable::SessionEvents => insert_sql!("session_events"),
        RawTable::ProductivityMetrics => insert_sql!("productivity_metrics"),
        RawTable::MetricSamples => insert_sql!("metric_samples"),
    }
}

/// Inserts the rows of `tables` among a batch's `rows` (search_path already points at the
/// tenant's schema), one statement per table, and returns the rows really inserted: not
/// those whose key (event id and time) was stored already, and a duplicate inside the batch
/// once. `feed_seq` is the batch's live feed position; each row's ordinal in `rows` goes with
/// it, and the ordinals the statement returns say which rows went in: an id alone would not,
/// since a sender may give two events the same id at different times.
pub async fn insert_tables<'r, 'a>(
    conn: &mut PgConnection,
    rows: &'r [RawRow<'a>],
    feed_seq: i64,
    tables: &[RawTable],
) -> sqlx::Result<Vec<&'r RawRow<'a>>> {
    let mut by_table: BTreeMap<RawTable, (Vec<&RawRow>, Vec<i32>)> = BTreeMap::new();
    for (ord, r) in rows.iter().enumerate() {
        if !tables.contains(&r.table) {
            continue;
        }
        let (rows, ords) = by_table.entry(r.table).or_default();
        rows.push(r);
        ords.push(i32::try_from(ord).unwrap_or(i32::MAX));
    }
    let mut inserted: Vec<&RawRow> = Vec::with_capacity(rows.len());
    for (table, (rows, ords)) in by_table {
        let mut new = insert_table(conn, table, &rows, (feed_seq, &ords)).await?;
        new.sort_unstable();
        // `ords` ascend, so each ordinal returned is found where its row is in `rows`.
        inserted.extend(
            new.into_iter()
                .filter_map(|o| ords.binary_search(&o).ok().map(|i| rows[i])),
        );
    }
    Ok(inserted)
}

/// Inserts one table's rows; `feed` is the batch's live feed seq and each row's ordinal.
async fn insert_table(
    conn: &mut PgConnection,
    table: RawTable,
    rows: &[&RawRow<'_>],
    feed: (i64, &[i32]),
) -> sqlx::Result<Vec<i32>> {
    // Columns are borrowed from the rows: nothing is copied on the way to the statement.
    let col =
        |f: for<'r> fn(&'r RawRow<'_>) -> &'r str| rows.iter().map(|r| f(r)).collect::<Vec<&str>>();
    sqlx::query_scalar(insert_sql(table))
        .bind(rows.iter().map(|r| r.event_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.occurred_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.received_at).collect::<Vec<_>>())
        .bind(col(|r| r.user_id))
        .bind(col(|r| r.team_id))
        .bind(col(|r| r.project_id))
        .bind(col(|r| r.session_id))
        .bind(col(|r| r.name))
        .bind(col(|r| r.status))
        .bind(rows.iter().map(|r| r.duration_ms).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.input_tokens).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.output_tokens).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.value).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.data.as_ref()).collect::<Vec<_>>())
        .bind(feed.1)
        .bind(feed.0)
        .fetch_all(conn)
        .await
}

/// `COPY` of raw rows in text format, the columns in [`copy_row`]'s order. Expanded at
/// compile time per table, so every statement is a `&'static str`.
macro_rules! copy_sql {
    ($table:literal) => {
        concat!(
            "COPY ",
            $table,
            " (event_id, occurred_at, received_at, user_id, team_id, project_id, session_id,
               name, status, duration_ms, input_tokens, output_tokens, value, data, feed_ord,
               feed_seq) FROM STDIN"
        )
    };
}

fn copy_sql(table: RawTable) -> &'static str {
    match table {
        RawTable::CommandExecutions => copy_sql!("command_executions"),
        RawTable::AgentInteractions => copy_sql!("agent_interactions"),
        RawTable::ToolExecutions => copy_sql!("tool_executions"),
        RawTable::SessionEvents => copy_sql!("session_events"),
        RawTable::ProductivityMetrics => copy_sql!("productivity_metrics"),
        RawTable::MetricSamples => copy_sql!("metric_samples"),
    }
}

/// Appends `s` to a COPY text-format line, escaped (backslash, and the separators tab,
/// newline and carriage return). Most text has none of them: a scan the compiler can
/// vectorise finds that out, and the text is appended whole. Otherwise the text between them
/// is appended whole: they are ASCII, so never part of another character's bytes.
pub(crate) fn copy_text(line: &mut String, s: &str) {
    let special = |b: u8| matches!(b, b'\\' | b'\t' | b'\n' | b'\r');
    if !s.bytes().fold(false, |any, b| any | special(b)) {
        line.push_str(s);
        return;
    }
    let mut from = 0;
    for (i, b) in s.bytes().enumerate() {
        let escaped = match b {
            b'\\' => "\\\\",
            b'\t' => "\\t",
            b'\n' => "\\n",
            b'\r' => "\\r",
            _ => continue,
        };
        line.push_str(&s[from..i]);
        line.push_str(escaped);
        from = i + 1;
    }
    line.push_str(&s[from..]);
}

/// One row as a COPY text-format line, as [`copy`] sends it (the row's ordinal `ord` in its
/// batch, the batch's `feed_seq`); `scratch` holds the `data` column's JSON on its way (kept
/// by the caller, so that it is allocated once). Public for the CPU example
/// (`tests/examples/projector_cpu.rs`).
pub fn copy_row(
    line: &mut String,
    scratch: &mut String,
    r: &RawRow<'_>,
    ord: usize,
    feed_seq: i64,
) {
    use chrono::SecondsFormat::Micros;
    use std::fmt::Write as _;
    let _ = write!(
        line,
        "{}\t{}\t{}\t",
        r.event_id,
        r.occurred_at.to_rfc3339_opts(Micros, true),
        r.received_at.to_rfc3339_opts(Micros, true)
    );
    for s in [
        &r.user_id,
        &r.team_id,
        &r.project_id,
        &r.session_id,
        &r.name,
        &r.status,
    ] {
        copy_text(line, s);
        line.push('\t');
    }
    let _ = write!(
        line,
        "{}\t{}\t{}\t{:?}\t",
        r.duration_ms, r.input_tokens, r.output_tokens, r.value
    );
    scratch.clear();
    let _ = write!(scratch, "{}", r.data);
    copy_text(line, scratch);
    let _ = writeln!(line, "\t{ord}\t{feed_seq}");
}

/// Gives `rows`, which this transaction inserted, the live feed position `feed_seq` instead
/// of the one they were written with (a batch written ahead whose position another writer
/// of the tenant took first: [`crate::batch::Pipeline`]). One statement per table, by key,
/// within the rows' time span so that only the partitions holding them are searched.
pub async fn restamp(
    conn: &mut PgConnection,
    rows: &[&RawRow<'_>],
    feed_seq: i64,
) -> sqlx::Result<()> {
    let mut by_table: BTreeMap<RawTable, (Vec<Uuid>, Vec<DateTime<Utc>>)> = BTreeMap::new();
    for r in rows {
        let (ids, times) = by_table.entry(r.table).or_default();
        ids.push(r.event_id);
        times.push(r.occurred_at);
    }
    for (table, (ids, times)) in by_table {
        let (Some(first), Some(last)) = (times.iter().min(), times.iter().max()) else {
            continue;
        };
        let sql = format!(
            "UPDATE {} AS t SET feed_seq = $1
               FROM UNNEST($2::uuid[], $3::timestamptz[]) AS k(event_id, occurred_at)
              WHERE t.event_id = k.event_id AND t.occurred_at = k.occurred_at
                AND t.occurred_at BETWEEN $4 AND $5",
            table.name()
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(feed_seq)
            .bind(&ids)
            .bind(&times)
            .bind(first)
            .bind(last)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Writes the rows of `tables` among a batch's `rows` with `COPY`, one per table
/// (search_path already points at the tenant's schema): the same rows and feed positions
/// (each row's ordinal in `rows`) as [`insert_tables`], without its conflict handling. Fails
/// with a unique violation (23505) if a key (event id and time) is stored already or comes
/// twice; the caller then rolls back and inserts instead.
pub async fn copy<'r, 'a>(
    conn: &mut PgConnection,
    rows: &'r [RawRow<'a>],
    feed_seq: i64,
    tables: &[RawTable],
) -> sqlx::Result<Vec<&'r RawRow<'a>>> {
    let copied: Vec<&RawRow> = rows.iter().filter(|r| tables.contains(&r.table)).collect();
    let mut lines = String::with_capacity(COPY_CHUNK_BYTES + 4096);
    let mut scratch = String::new();
    for table in RawTable::ALL {
        if !tables.contains(&table) || !copied.iter().any(|r| r.table == table) {
            continue;
        }
        // Sent a chunk at a time, so that PostgreSQL stores each while the next is written.
        let mut copy = conn.copy_in_raw(copy_sql(table)).await?;
        for (ord, r) in rows.iter().enumerate().filter(|(_, r)| r.table == table) {
            copy_row(&mut lines, &mut scratch, r, ord, feed_seq);
            if lines.len() >= COPY_CHUNK_BYTES {
                copy.send(lines.as_bytes()).await?;
                lines.clear();
            }
        }
        if !lines.is_empty() {
            copy.send(lines.as_bytes()).await?;
            lines.clear();
        }
        copy.finish().await?;
    }
    Ok(copied)
}

/// How much of a [`copy`] is written before it is sent.
const COPY_CHUNK_BYTES: usize = 128 << 10;

/// The raw tables of `rows` split in two, for a bulk batch's two connections: taken from
/// the largest down, each table goes to whichever half has fewer rows so far, so that both
/// copy about as much. Depends only on `rows`, so a batch written again splits alike.
pub fn halves(rows: &[RawRow<'_>]) -> [Vec<RawTable>; 2] {
    let mut sizes: Vec<(usize, RawTable)> = RawTable::ALL
        .iter()
        .map(|t| (rows.iter().filter(|r| r.table == *t).count(), *t))
        .collect();
    sizes.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut halves: [(usize, Vec<RawTable>); 2] = Default::default();
    for (n, table) in sizes {
        let half = usize::from(halves[1].0 < halves[0].0);
        halves[half].0 += n;
        halves[half].1.push(table);
    }
    halves.map(|(_, tables)| tables)
}

/// The first [`MAX_NAME_LEN`] characters of `s`: what a label's value fills a dimension
/// (user, team, project, session) with.
fn name_of(s: &str) -> &str {
    // No more bytes than that is no more characters: nearly every id, and no scan.
    if s.len() <= MAX_NAME_LEN {
        return s;
    }
    s.char_indices()
        .nth(MAX_NAME_LEN)
        .map_or(s, |(at, _)| &s[..at])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_fills_its_dimension_as_a_name() {
        let long = "é".repeat(1024);
        assert_eq!(name_of(&long).chars().count(), 255);
        assert_eq!(name_of(&long), &long[..510]);
        assert_eq!(name_of("u"), "u");
        let ascii = "a".repeat(300);
        assert_eq!(name_of(&ascii), &ascii[..255]);
        assert_eq!(name_of(&ascii[..255]), &ascii[..255]);
    }

    #[test]
    fn each_table_is_inserted_into_by_its_own_name() {
        for table in RawTable::ALL {
            let sql = insert_sql(table);
            assert!(
                sql.starts_with(&format!("INSERT INTO {} (", table.name())),
                "{sql}"
            );
            let copy = copy_sql(table);
            assert!(copy.starts_with(&format!("COPY {} (", table.name())));
        }
    }

    #[test]
    fn a_bulk_batch_splits_its_tables_into_halves_of_about_as_many_rows() {
        let t = chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("a time");
        let row = |table: RawTable| RawRow {
            table,
            event_type: table.event_type(""),
            event_id: Uuid::new_v4(),
            occurred_at: t,
            received_at: t,
            user_id: "u",
            team_id: "",
            project_id: "",
            session_id: "",
            name: "",
            status: "",
            is_error: false,
            duration_ms: 0,
            input_tokens: 0,
            output_tokens: 0,
            value: 0.0,
            data: Cow::Owned(Value::Null),
        };
        let sizes = [
            (RawTable::ToolExecutions, 25),
            (RawTable::CommandExecutions, 50),
            (RawTable::ProductivityMetrics, 5),
            (RawTable::AgentInteractions, 30),
            (RawTable::SessionEvents, 10),
        ];
        let rows: Vec<RawRow> = sizes
            .iter()
            .flat_map(|&(table, n)| (0..n).map(move |_| row(table)))
            .collect();
        let [first, second] = halves(&rows);
        let count = |tables: &[RawTable]| rows.iter().filter(|r| tables.contains(&r.table)).count();
        assert_eq!((count(&first), count(&second)), (60, 60));
        // Every table is in exactly one half, the empty one too.
        for table in RawTable::ALL {
            assert_ne!(first.contains(&table), second.contains(&table), "{table:?}");
        }
        // The same rows in another order split alike.
        let mut reversed = rows.clone();
        reversed.reverse();
        assert_eq!(halves(&reversed), [first, second]);
    }

    #[test]
    fn copy_lines_escape_the_separators() {
        let mut line = String::new();
        copy_text(&mut line, "a\tb\nc\\d\re");
        assert_eq!(line, "a\\tb\\nc\\\\d\\re");
        // Characters of several bytes between them, and at either end.
        line.clear();
        copy_text(&mut line, "é\t✓\\ü\n");
        assert_eq!(line, "é\\t✓\\\\ü\\n");
        line.clear();
        copy_text(&mut line, "");
        assert_eq!(line, "");
    }

    #[test]
    fn a_rows_text_and_json_are_escaped_in_its_copy_line() {
        let t = chrono::DateTime::from_timestamp(1_700_000_000, 123_456_000).expect("a time");
        let data = serde_json::json!({"cmd": "a\tb\\c\nd", "ü": "✓"});
        let row = RawRow {
            table: RawTable::CommandExecutions,
            event_type: "command.executed",
            event_id: Uuid::nil(),
            occurred_at: t,
            received_at: t,
            user_id: "u\tü",
            team_id: "",
            project_id: "p\\",
            session_id: "s",
            name: "n\r",
            status: "success",
            is_error: false,
            duration_ms: 7,
            input_tokens: 1,
            output_tokens: 2,
            value: 0.5,
            data: Cow::Borrowed(&data),
        };
        let (mut line, mut scratch) = (String::new(), String::from("left over"));
        copy_row(&mut line, &mut scratch, &row, 3, 9);
        let columns: Vec<&str> = line
            .strip_suffix('\n')
            .expect("one line")
            .split('\t')
            .collect();
        assert_eq!(
            columns,
            [
                "00000000-0000-0000-0000-000000000000",
                "2023-11-14T22:13:20.123456Z",
                "2023-11-14T22:13:20.123456Z",
                "u\\tü",
                "",
                "p\\\\",
                "s",
                "n\\r",
                "success",
                "7",
                "1",
                "2",
                "0.5",
                // JSON escapes the separators itself; COPY's escaping doubles the backslashes.
                "{\"cmd\":\"a\\\\tb\\\\\\\\c\\\\nd\",\"ü\":\"✓\"}",
                "3",
                "9",
            ]
        );
    }
}
