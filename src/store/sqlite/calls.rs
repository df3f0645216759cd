//! Raw-call records in SQLite, packed: the calls of one function in one write are one row of
//! `call_batches` (see [`crate::store::calls`]), so recording a call costs a share of one
//! row instead of a row and three index entries. A packed call's run name points at its
//! row and its place in it; listing merges the packed calls with the `runs` table in the
//! same order (newest first: start time, then name).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rusqlite::{Connection, OptionalExtension, params};

use super::backend;
use crate::model::{Run, Status};
use crate::store::calls::{CallBatch, CallPlace, CallRecord, MAX_BATCH, unpack};
use crate::store::{RunPosition, RunQuery, StoreError};

/// Writes batches of calls (inside the caller's transaction).
pub fn insert(conn: &Connection, batches: &[CallBatch]) -> Result<(), StoreError> {
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO call_batches (function_name, first_us, last_us, calls, errors, records)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .map_err(backend)?;
    for b in batches.iter().filter(|b| b.calls > 0) {
        debug_assert!(b.calls <= MAX_BATCH);
        insert
            .execute(params![
                b.function_name,
                b.first_us,
                b.last_us,
                b.calls as i64,
                b.errors as i64,
                b.packed.as_slice()
            ])
            .map_err(backend)?;
    }
    Ok(())
}

/// The packed call a run name points at, as a run.
pub fn get(conn: &Connection, name: &str) -> Result<Option<Run>, StoreError> {
    let Some(place) = CallPlace::of(name) else {
        return Ok(None);
    };
    let row: Option<(String, Vec<u8>)> = conn
        .query_row(
            "SELECT function_name, records FROM call_batches WHERE id = ?1",
            [place.batch],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(backend)?;
    let Some((function_name, records)) = row else {
        return Ok(None);
    };
    let calls = unpack(&records).map_err(backend)?;
    // A batch id is used again once every batch after it has gone (SQLite's rowids): the
    // call's start, in the name too, tells an old name from the new batch's call.
    Ok(calls
        .get(place.index)
        .filter(|call| CallPlace::at(place.batch, place.index, call) == place)
        .map(|call| call.to_run(name.to_string(), &function_name)))
}

/// The newest packed calls matching `query`, at most `query.limit`, newest first, with
/// their places in the listing order.
pub fn list(conn: &Connection, query: &RunQuery) -> Result<Vec<(RunPosition, Run)>, StoreError> {
    // Raw calls carry no tags and end READY or ERROR.
    let wanted_status = match query.status {
        None => None,
        Some(s @ (Status::Ready | Status::Error)) => Some(s),
        Some(_) => return Ok(Vec::new()),
    };
    if !query.tags.is_empty() || query.limit == 0 {
        return Ok(Vec::new());
    }
    let mut sql =
        String::from("SELECT id, function_name, last_us, records FROM call_batches WHERE 1 = 1");
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(f) = &query.function_name {
        args.push(f.clone().into());
        sql.push_str(&format!(" AND function_name = ?{}", args.len()));
    }
    let since_us = query.since.map(|s| s * 1_000_000);
    if let Some(since) = since_us {
        args.push(since.into());
        sql.push_str(&format!(" AND last_us >= ?{}", args.len()));
    }
    if let Some(after) = &query.after {
        args.push(after.started_us.into());
        sql.push_str(&format!(" AND first_us <= ?{}", args.len()));
    }
    match wanted_status {
        Some(Status::Error) => sql.push_str(" AND errors > 0"),
        Some(_) => sql.push_str(" AND errors < calls"),
        None => {}
    }
    sql.push_str(" ORDER BY last_us DESC, id DESC");

    let limit = query.limit as usize;
    // The best `limit` so far, the worst of them on top.
    let mut best: BinaryHeap<Reverse<(i64, String, usize)>> = BinaryHeap::new();
    let mut found: Vec<(String, CallRecord)> = Vec::new();
    let mut stmt = conn.prepare_cached(&sql).map_err(backend)?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(args))
        .map_err(backend)?;
    while let Some(row) = rows.next().map_err(backend)? {
        let last_us: i64 = row.get(2).map_err(backend)?;
        // Batches come latest start first: once the `limit`th best started after this
        // batch's latest call, no later batch has a better one.
        if best.len() == limit && best.peek().is_some_and(|Reverse(w)| w.0 > last_us) {
            break;
        }
        let id: i64 = row.get(0).map_err(backend)?;
        let function_name: String = row.get(1).map_err(backend)?;
        let records: Vec<u8> = row.get(3).map_err(backend)?;
        for (index, call) in unpack(&records).map_err(backend)?.into_iter().enumerate() {
            if since_us.is_some_and(|s| call.started_us < s)
                || wanted_status.is_some_and(|s| (s == Status::Error) != call.failed())
            {
                continue;
            }
            let name = CallPlace::at(id, index, &call).name();
            let key = (call.started_us, name);
            if let Some(after) = &query.after
                && (key.0, key.1.as_str()) >= (after.started_us, after.name.as_str())
            {
                continue;
            }
            if best.len() == limit {
                match best.peek() {
                    Some(Reverse(worst)) if (worst.0, &worst.1) < (key.0, &key.1) => {
                        best.pop();
                    }
                    _ => continue,
                }
            }
            best.push(Reverse((key.0, key.1, found.len())));
            found.push((function_name.clone(), call));
        }
    }
    let mut listed: Vec<(RunPosition, Run)> = best
        .into_iter()
        .map(|Reverse((started_us, name, at))| {
            let (function_name, call) = &found[at];
            let run = call.to_run(name.clone(), function_name);
            (RunPosition { started_us, name }, run)
        })
        .collect();
    listed.sort_by(|a, b| (b.0.started_us, &b.0.name).cmp(&(a.0.started_us, &a.0.name)));
    Ok(listed)
}

/// Removes the batches whose every call started before `before_us`. Returns how many calls
/// went.
pub fn prune_before(conn: &Connection, before_us: i64) -> Result<u64, StoreError> {
    let removed: i64 = conn
        .query_row(
            "SELECT COALESCE(SUM(calls), 0) FROM call_batches WHERE last_us < ?1",
            [before_us],
            |r| r.get(0),
        )
        .map_err(backend)?;
    conn.execute("DELETE FROM call_batches WHERE last_us < ?1", [before_us])
        .map_err(backend)?;
    Ok(removed as u64)
}

/// How many calls are packed.
pub fn count(conn: &Connection) -> Result<u64, StoreError> {
    let calls: i64 = conn
        .query_row(
            "SELECT COALESCE(SUM(calls), 0) FROM call_batches",
            [],
            |r| r.get(0),
        )
        .map_err(backend)?;
    Ok(calls as u64)
}

/// The oldest batch: its id, its latest start and how many calls it holds.
pub fn oldest(conn: &Connection) -> Result<Option<(i64, i64, u64)>, StoreError> {
    conn.query_row(
        "SELECT id, last_us, calls FROM call_batches ORDER BY last_us, id LIMIT 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)),
    )
    .optional()
    .map_err(backend)
}

pub fn remove(conn: &Connection, id: i64) -> Result<(), StoreError> {
    conn.execute("DELETE FROM call_batches WHERE id = ?1", [id])
        .map_err(backend)?;
    Ok(())
}
