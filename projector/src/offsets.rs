//! Where each partition stands: the next offset to project, stored in
//! `control.projector_offsets` with the rows it covers, advanced by every batch as a
//! compare-and-set; where a partition resumes from it; and the stalls of batches that
//! cannot land.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::{PgConnection, PgPool};

use crate::batch::WriteError;

/// The range of offsets a batch covers on one partition: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetRange {
    pub start: i64,
    pub end: i64,
}

/// The next offset to project of a partition whose stored offset is `stored`. A partition
/// never projected starts at 0, like any other: whatever Kafka's own committed offset says,
/// the records before the first one read are projected.
pub fn next_offset(stored: Option<i64>) -> i64 {
    stored.unwrap_or(0)
}

/// What the consume loop does with a record, given where its partition stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Below the next offset: already projected (a redelivery after a seek). Skip it.
    Skip,
    /// Project it. The batch's compare-and-set expects the stored offset at `from`: the
    /// record's own offset, or the next offset when the records before this one expired from
    /// the log unprojected (`expired` of them: counted and logged, never read).
    Take { from: i64, expired: i64 },
    /// Records between the next offset and this one were not read here but are still in the
    /// log (this consumer started further on, or dropped them while paused): seek back.
    SeekBack,
}

/// Where a partition resumes: what to do with the record at `offset` when the partition's
/// next offset to project is `next`. `log_start` gives the first offset still in the
/// partition's log (retention deletes older records; `None` when it cannot be read) and is
/// asked only when the record is beyond `next`.
///
/// A record at `next` is taken. One beyond it is taken only if it is the first record there
/// is: the ones between expired before they were projected and nothing can bring them back,
/// so the partition goes on from there rather than seeking back forever. Otherwise it is a
/// gap, and the partition is sought back to `next`.
pub fn resume(next: i64, offset: i64, log_start: impl FnOnce() -> Option<i64>) -> Resume {
    if offset < next {
        Resume::Skip
    } else if offset == next {
        Resume::Take {
            from: offset,
            expired: 0,
        }
    } else if log_start() == Some(offset) {
        Resume::Take {
            from: next,
            expired: offset - next,
        }
    } else {
        Resume::SeekBack
    }
}

/// Compare-and-set of one partition's next offset. A batch may only advance a partition
/// from where the stored offset says it stands; otherwise the instance was fenced.
pub async fn advance(
    conn: &mut PgConnection,
    projection: &str,
    topic: &str,
    partition: i32,
    range: OffsetRange,
) -> Result<(), WriteError> {
    let updated = sqlx::query(
        "UPDATE control.projector_offsets
            SET next_offset = $5, updated_at = now(), stalled_since = NULL, last_error = NULL
          WHERE projection = $1 AND topic = $2 AND partition = $3 AND next_offset = $4",
    )
    .bind(projection)
    .bind(topic)
    .bind(partition)
    .bind(range.start)
    .bind(range.end)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if updated == 1 {
        return Ok(());
    }
    // No row matched: either this partition was never projected (then the batch must start
    // at its beginning, and is inserted), or it moved (then the insert finds the row and
    // does nothing, and we are fenced).
    if range.start != 0 {
        return Err(WriteError::Fenced { partition });
    }
    let inserted = sqlx::query(
        "INSERT INTO control.projector_offsets (projection, topic, partition, next_offset)
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(projection)
    .bind(topic)
    .bind(partition)
    .bind(range.end)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 1 {
        Ok(())
    } else {
        Err(WriteError::Fenced { partition })
    }
}

/// The stored next offsets of a projection's partitions on a topic.
pub async fn stored(
    pool: &PgPool,
    projection: &str,
    topic: &str,
) -> sqlx::Result<HashMap<i32, i64>> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM control.projector_offsets
          WHERE projection = $1 AND topic = $2",
    )
    .bind(projection)
    .bind(topic)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Records on the stored offsets of `partitions` that their batch keeps failing, and why,
/// for `projector status` (cleared by the next batch that lands). Best effort: the database
/// may be the thing that is failing.
pub async fn note_stall(
    pool: &PgPool,
    projection: &str,
    topic: &str,
    partitions: &[i32],
    error: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE control.projector_offsets
            SET stalled_since = coalesce(stalled_since, now()), last_error = left($4, 2000)
          WHERE projection = $1 AND topic = $2 AND partition = ANY($3)",
    )
    .bind(projection)
    .bind(topic)
    .bind(partitions)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Which consume loops cannot commit their batch, since when and why. `/readyz` and
/// `/metrics` show it; `projector status` reads the same from the stored offsets.
#[derive(Clone, Default)]
pub struct Stalls(Arc<Mutex<BTreeMap<String, Stall>>>);

/// One consume loop's failing batch.
#[derive(Clone, Debug)]
pub struct Stall {
    pub since: Instant,
    pub partitions: Vec<i32>,
    pub error: String,
}

impl Stalls {
    pub(crate) fn set(&self, topic: &str, partitions: &[i32], error: &str) {
        let mut all = self.0.lock().expect("stalls");
        let stall = all.entry(topic.to_string()).or_insert_with(|| Stall {
            since: Instant::now(),
            partitions: Vec::new(),
            error: String::new(),
        });
        stall.partitions = partitions.to_vec();
        stall.error = error.to_string();
        metrics::gauge!("projector_stalled_partitions", "topic" => topic.to_string())
            .set(partitions.len() as f64);
        metrics::gauge!("projector_stalled_seconds", "topic" => topic.to_string())
            .set(stall.since.elapsed().as_secs_f64());
    }

    pub(crate) fn clear(&self, topic: &str) {
        if self.0.lock().expect("stalls").remove(topic).is_some() {
            metrics::gauge!("projector_stalled_partitions", "topic" => topic.to_string()).set(0.0);
            metrics::gauge!("projector_stalled_seconds", "topic" => topic.to_string()).set(0.0);
        }
    }

    /// The loops stalled for longer than `at_least`, by topic.
    pub fn longer_than(&self, at_least: Duration) -> Vec<(String, Stall)> {
        let all = self.0.lock().expect("stalls");
        all.iter()
            .filter(|(_, s)| s.since.elapsed() >= at_least)
            .map(|(t, s)| (t.clone(), s.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unasked() -> Option<i64> {
        panic!("the log start is read only for records beyond the next offset")
    }

    #[test]
    fn a_fresh_partition_starts_at_zero() {
        assert_eq!(next_offset(None), 0);
        assert_eq!(next_offset(Some(42)), 42);
        assert_eq!(
            resume(next_offset(None), 0, unasked),
            Resume::Take {
                from: 0,
                expired: 0
            }
        );
    }

    #[test]
    fn the_record_at_the_stored_offset_is_taken() {
        assert_eq!(
            resume(10, 10, unasked),
            Resume::Take {
                from: 10,
                expired: 0
            }
        );
    }

    #[test]
    fn records_below_the_stored_offset_are_skipped() {
        assert_eq!(resume(10, 9, unasked), Resume::Skip);
        assert_eq!(resume(10, 0, unasked), Resume::Skip);
    }

    #[test]
    fn a_gap_still_in_the_log_is_sought_back() {
        // The log starts before the gap, or at some other record.
        assert_eq!(resume(10, 15, || Some(3)), Resume::SeekBack);
        assert_eq!(resume(10, 15, || Some(10)), Resume::SeekBack);
        assert_eq!(resume(0, 7, || Some(0)), Resume::SeekBack);
        // The log start cannot be read: seek back rather than skip anything.
        assert_eq!(resume(10, 15, || None), Resume::SeekBack);
    }

    #[test]
    fn records_expired_before_they_were_projected_are_counted_and_passed() {
        // Retention deleted 10..15: the log's first record is the one read.
        assert_eq!(
            resume(10, 15, || Some(15)),
            Resume::Take {
                from: 10,
                expired: 5
            }
        );
        // A fresh partition whose log no longer starts at 0.
        assert_eq!(
            resume(next_offset(None), 1000, || Some(1000)),
            Resume::Take {
                from: 0,
                expired: 1000
            }
        );
    }
}
