//! Static SQL templates for the batch writer, expanded at compile time per table so every
//! statement is a `&'static str` (no SQL is formatted at run time here).

/// `INSERT` of raw rows from parallel arrays, ignoring event ids already stored, returning
/// the ids that were really inserted. Every row gets the live feed's position: the batch's
/// `feed_seq` (`$16`) and its own ordinal (`$15`).
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
             RETURNING event_id"
        )
    };
}

/// Upsert of rollup deltas from parallel arrays (keys unique within one statement).
macro_rules! rollup_sql {
    ($table:literal) => {
        concat!(
            "INSERT INTO ",
            $table,
            " AS a (bucket, event_type, user_id, team_id, project_id, name, count, errors,
                   duration_sum, duration_max, input_tokens, output_tokens, value_sum,
                   duration_hist)
             SELECT b, t, u, tm, p, n, c, e, ds, dm, it, ot, vs, h::bigint[]
               FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],
                           $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[],
                           $11::bigint[], $12::bigint[], $13::float8[], $14::text[])
                    AS x(b, t, u, tm, p, n, c, e, ds, dm, it, ot, vs, h)
             ON CONFLICT (bucket, event_type, user_id, team_id, project_id, name) DO UPDATE SET
                count = a.count + EXCLUDED.count,
                errors = a.errors + EXCLUDED.errors,
                duration_sum = a.duration_sum + EXCLUDED.duration_sum,
                duration_max = GREATEST(a.duration_max, EXCLUDED.duration_max),
                input_tokens = a.input_tokens + EXCLUDED.input_tokens,
                output_tokens = a.output_tokens + EXCLUDED.output_tokens,
                value_sum = a.value_sum + EXCLUDED.value_sum,
                duration_hist = hist_add(a.duration_hist, EXCLUDED.duration_hist)"
        )
    };
}
