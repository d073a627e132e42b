//! Undoing a step's changes to a global cache's host data (the kept entries' scores and
//! positions, the window rows' scores) for a backup.
//!
//! `forward_batch` takes a backup of every state before every step, and a backup used to
//! clone these vectors: at 32 sequences ~20 KB per layer and sequence, 2.0-2.6 ms a step
//! serially before a 55-60 ms step (decode bench, context 300, Zen 5, 2 threads). A backup
//! now holds none of them: while it lives, the cache logs, before each change, what undoes
//! it, and [`replay`] runs the log backwards over the vectors the live cache ends with. A
//! decode step changes an entry or two per head and replaces the window's scores (copied
//! into the log the first time; what later replaces them need not be kept). Taking the 32
//! backups now costs 0.4-0.5 ms; dropping them after the step still costs 2.5-3.5 ms
//! (2.6-4.1 before): what the step replaced is freed there, old recurrent memories and
//! rows' journals included.

use std::sync::{Arc, Mutex, Weak};

use super::Scores;

/// What undoes one change.
#[derive(Debug, Clone)]
pub(super) enum Change {
    /// Entries an admission wrote over or dropped.
    Entries(Entries),
    /// The window rows' scores before they were changed or replaced.
    Window(Vec<Vec<Scores>>),
    /// The kept entries' scores and positions before they were replaced whole.
    Kept(Vec<Vec<Scores>>, Vec<Vec<u32>>),
}

/// Before an admission rewrote some entries: how many heads and entries per head there
/// were, and the entries it wrote over or dropped (head, place, value).
#[derive(Debug, Clone)]
pub(super) struct Entries {
    score_lens: Vec<usize>,
    position_lens: Vec<usize>,
    scores: Vec<(usize, usize, Scores)>,
    positions: Vec<(usize, usize, u32)>,
}

impl Entries {
    /// Nothing saved yet: the heads' lengths.
    pub fn new(scores: &[Vec<Scores>], positions: &[Vec<u32>]) -> Self {
        Self {
            score_lens: scores.iter().map(Vec::len).collect(),
            position_lens: positions.iter().map(Vec::len).collect(),
            scores: Vec::new(),
            positions: Vec::new(),
        }
    }

    /// Saves head `h`'s entries at `places` (those it has) before they are written over
    /// or dropped.
    pub fn save(
        &mut self,
        h: usize,
        places: impl Iterator<Item = usize>,
        (row_scores, row_positions): (&[Scores], &[u32]),
    ) {
        for i in places {
            if let Some(&s) = row_scores.get(i) {
                self.scores.push((h, i, s));
            }
            if let Some(&p) = row_positions.get(i) {
                self.positions.push((h, i, p));
            }
        }
    }
}

/// A backup's log of the changes since it was taken, oldest first.
pub(super) type Log = Mutex<History>;

#[derive(Debug, Default)]
pub(super) struct History {
    changes: Vec<Change>,
    /// Whether the window's scores are saved already: replayed backwards, the first
    /// [`Change::Window`] sets them last, so later ones need not be kept (a decode step
    /// changes them twice: the running sums, then the rows that leave).
    window_saved: bool,
}

impl History {
    fn push(&mut self, change: Change) {
        if matches!(change, Change::Window(_)) {
            if self.window_saved {
                return;
            }
            self.window_saved = true;
        }
        self.changes.push(change);
    }
}

/// The logs of a cache's live backups (more than one when a backup is taken during
/// another's step: the server's before a drafted step, `forward_batch`'s inside it). A
/// clone (a fork, a snapshot) logs for nobody: its changes are its own.
#[derive(Debug, Default)]
pub(super) struct Logs(Vec<Weak<Log>>);

impl Clone for Logs {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl Logs {
    /// A new log, which every change records into from now on.
    pub fn open(&mut self) -> Arc<Log> {
        let log = Arc::new(Log::default());
        self.0.retain(|l| l.strong_count() > 0);
        self.0.push(Arc::downgrade(&log));
        log
    }

    /// The live backups' logs (those of dropped backups are let go).
    fn live(&mut self) -> impl Iterator<Item = Arc<Log>> + '_ {
        self.0.retain(|l| l.strong_count() > 0);
        self.0.iter().filter_map(Weak::upgrade)
    }

    /// Whether a backup is alive to log for (so a change that must copy to be undone
    /// copies only then).
    pub fn active(&mut self) -> bool {
        self.live().next().is_some()
    }

    /// Whether some live backup has not saved the window's scores yet (so that saving
    /// them means copying them).
    pub fn window_unsaved(&mut self) -> bool {
        self.live()
            .any(|l| !l.lock().expect("a log lock").window_saved)
    }

    /// Records `change` in every live backup's log (dropped when there is none).
    pub fn record(&mut self, change: Change) {
        let mut logs = self.live().peekable();
        let mut change = Some(change);
        while let Some(log) = logs.next() {
            let mut log = log.lock().expect("a log lock");
            match logs.peek() {
                Some(_) => log.push(change.clone().expect("kept for the last log")),
                None => log.push(change.take().expect("one last log")),
            }
        }
    }
}

/// The host data a log undoes changes to.
pub(super) struct Host<'a> {
    pub kept_scores: &'a mut Vec<Vec<Scores>>,
    pub positions: &'a mut Vec<Vec<u32>>,
    pub window_scores: &'a mut Vec<Vec<Scores>>,
}

/// Undoes `log`'s changes, newest first, over `host` (the data they were made to).
pub(super) fn replay(log: History, host: Host<'_>) {
    for change in log.changes.into_iter().rev() {
        match change {
            Change::Window(w) => *host.window_scores = w,
            Change::Kept(s, p) => (*host.kept_scores, *host.positions) = (s, p),
            Change::Entries(e) => {
                undo_entries(host.kept_scores, &e.score_lens, e.scores, (0.0, 0.0));
                undo_entries(host.positions, &e.position_lens, e.positions, 0);
            }
        }
    }
}

/// Puts `saved` entries back (newest first) and cuts every head, and the heads, to the
/// lengths they had.
fn undo_entries<T: Copy>(
    rows: &mut Vec<Vec<T>>,
    lens: &[usize],
    saved: Vec<(usize, usize, T)>,
    fill: T,
) {
    // Places (and heads) dropped since are given back before their values are.
    if rows.len() < lens.len() {
        rows.resize(lens.len(), Vec::new());
    }
    for (row, &len) in rows.iter_mut().zip(lens) {
        if row.len() < len {
            row.resize(len, fill);
        }
    }
    for (h, i, value) in saved.into_iter().rev() {
        rows[h][i] = value;
    }
    rows.truncate(lens.len());
    for (row, &len) in rows.iter_mut().zip(lens) {
        row.truncate(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_undoes_written_dropped_and_added_entries_and_replaced_windows() {
        let (mut scores, mut positions) = (vec![vec![(1.0, 1.5), (2.0, 2.5)]], vec![vec![7, 8]]);
        let mut window = vec![vec![(0.5, 0.5)]];
        let before = (scores.clone(), positions.clone(), window.clone());
        let mut logs = Logs::default();
        let log = logs.open();
        // An admission that writes place 0 over, drops place 1 and adds a second head.
        let mut entries = Entries::new(&scores, &positions);
        entries.save(0, [0, 1].into_iter(), (&scores[0], &positions[0]));
        logs.record(Change::Entries(entries));
        scores[0] = vec![(9.0, 9.0)];
        positions[0] = vec![3];
        scores.push(vec![(4.0, 4.0)]);
        positions.push(vec![5]);
        // The window replaced twice: only the first is kept.
        let second = vec![vec![(6.0, 6.0)]];
        logs.record(Change::Window(std::mem::replace(&mut window, second)));
        logs.record(Change::Window(std::mem::take(&mut window)));
        assert_eq!(log.lock().unwrap().changes.len(), 2);
        // A fork logs for nobody.
        let mut fork = logs.clone();
        fork.record(Change::Window(vec![]));
        assert_eq!(log.lock().unwrap().changes.len(), 2);
        let changes = std::mem::take(&mut *log.lock().unwrap());
        let host = Host {
            kept_scores: &mut scores,
            positions: &mut positions,
            window_scores: &mut window,
        };
        replay(changes, host);
        assert_eq!((scores, positions, window), before);
        drop(log);
        assert!(!logs.active(), "a dropped backup's log is let go");
    }
}
