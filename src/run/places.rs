//! Which step builds next when more are ready than may run at once: the one at the start of
//! the longest chain of steps still to come, so that the run's critical path (sources, then
//! the models and identity resolutions built on them, then what is built on those) is not kept
//! waiting behind steps with nothing after them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// For each table the given steps (tables read, tables written) write: how many steps the
/// longest chain from the step writing it to the end has, that step included. A step reading
/// a table continues the chain of the step writing it.
pub(super) fn chain_lengths(steps: &[(Vec<String>, Vec<String>)]) -> HashMap<String, usize> {
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, (reads, _)) in steps.iter().enumerate() {
        for t in reads {
            readers.entry(t.as_str()).or_default().push(i);
        }
    }
    let mut longest: Vec<Option<usize>> = vec![None; steps.len()];
    let mut on_path = vec![false; steps.len()];
    let mut out: HashMap<String, usize> = HashMap::new();
    for i in 0..steps.len() {
        let n = chain_from(i, steps, &readers, &mut longest, &mut on_path);
        for t in &steps[i].1 {
            let m = out.entry(t.clone()).or_default();
            *m = (*m).max(n);
        }
    }
    out
}

/// The steps on the longest chain starting at step `i` (a step that reads what a later step of
/// its own chain writes ends the chain there).
fn chain_from(
    i: usize,
    steps: &[(Vec<String>, Vec<String>)],
    readers: &HashMap<&str, Vec<usize>>,
    longest: &mut [Option<usize>],
    on_path: &mut [bool],
) -> usize {
    if let Some(n) = longest[i] {
        return n;
    }
    if on_path[i] {
        return 0;
    }
    on_path[i] = true;
    let mut after = 0;
    for t in &steps[i].1 {
        for &j in readers.get(t.as_str()).into_iter().flatten() {
            if j != i {
                after = after.max(chain_from(j, steps, readers, longest, on_path));
            }
        }
    }
    on_path[i] = false;
    longest[i] = Some(after + 1);
    after + 1
}

/// Places for the steps of the pipelines building side by side: each step holds one while it
/// builds. A place given back goes to the waiting step of the longest chain, then to the one
/// that asked first.
pub(super) struct Places {
    queue: Mutex<Queue>,
}

struct Queue {
    free: usize,
    asked: u64,
    waiting: BinaryHeap<Asking>,
}

/// A step waiting for a place: its chain length, then the order it asked in.
struct Asking {
    rank: (usize, Reverse<u64>),
    give: oneshot::Sender<Place>,
}

impl PartialEq for Asking {
    fn eq(&self, other: &Self) -> bool {
        self.rank == other.rank
    }
}

impl Eq for Asking {}

impl PartialOrd for Asking {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Asking {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank.cmp(&other.rank)
    }
}

/// A place held; dropping it gives it back.
pub(super) struct Place(Option<Arc<Places>>);

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(places) = self.0.take() {
            places.give_back();
        }
    }
}

impl Places {
    pub fn new(n: usize) -> Arc<Places> {
        Arc::new(Places {
            queue: Mutex::new(Queue {
                free: n,
                asked: 0,
                waiting: BinaryHeap::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a step at the start of a chain of `chain` steps, once one is free and no
    /// step of a longer chain (or of as long a one, which asked earlier) waits for it.
    pub async fn take(self: &Arc<Self>, chain: usize) -> Place {
        loop {
            let given = {
                let mut queue = self.lock();
                if queue.free > 0 {
                    queue.free -= 1;
                    return Place(Some(self.clone()));
                }
                let (give, given) = oneshot::channel();
                queue.asked += 1;
                let asked = queue.asked;
                queue.waiting.push(Asking {
                    rank: (chain, Reverse(asked)),
                    give,
                });
                given
            };
            // A sender is dropped unused only with the queue; ask again then.
            if let Ok(place) = given.await {
                return place;
            }
        }
    }

    /// Hand a place given back to the first waiting step still waiting, or free it.
    fn give_back(self: Arc<Self>) {
        let mut place = Place(Some(self.clone()));
        loop {
            let next = {
                let mut queue = self.lock();
                match queue.waiting.pop() {
                    Some(next) => next,
                    None => {
                        queue.free += 1;
                        drop(queue);
                        // Freed above: forgotten, not given back again.
                        place.0 = None;
                        return;
                    }
                }
            };
            match next.give.send(place) {
                Ok(()) => return,
                // That step stopped waiting: the next one.
                Err(back) => place = back,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(reads: &[&str], writes: &[&str]) -> (Vec<String>, Vec<String>) {
        let v = |t: &[&str]| t.iter().map(|s| s.to_string()).collect();
        (v(reads), v(writes))
    }

    #[test]
    fn a_table_ranks_by_the_longest_chain_built_on_it() {
        let chains = chain_lengths(&[
            step(&[], &["raw_customers"]),
            step(&[], &["raw_products"]),
            step(&["raw_customers"], &["stg_customers"]),
            step(&["stg_customers"], &["map", "golden"]),
            step(&["golden"], &["dim_customer"]),
            step(&["raw_products"], &["dim_product"]),
            step(&["dim_customer", "dim_product"], &["fact"]),
            // A model reading itself does not loop.
            step(&["fact", "summary"], &["summary"]),
        ]);
        let of = |t: &str| chains[t];
        assert_eq!(of("summary"), 1);
        assert_eq!(of("fact"), 2);
        assert_eq!(of("dim_product"), 3);
        assert_eq!(of("raw_products"), 4);
        assert_eq!((of("map"), of("golden")), (4, 4));
        assert_eq!(of("raw_customers"), 6);
    }

    #[tokio::test]
    async fn a_freed_place_goes_to_the_longest_chain_then_the_first_to_ask() {
        let places = Places::new(1);
        let held = places.take(1).await;
        let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut waiting = Vec::new();
        for (name, chain) in [
            ("short", 1),
            ("long", 5),
            ("middle", 3),
            ("middle later", 3),
        ] {
            let (asking, order_tx) = (places.clone(), order_tx.clone());
            waiting.push(tokio::spawn(async move {
                let place = asking.take(chain).await;
                order_tx.send(name).unwrap();
                drop(place);
            }));
            // Each asks before the next.
            while places.lock().waiting.len() < waiting.len() {
                tokio::task::yield_now().await;
            }
        }
        // One stops waiting: the place skips it.
        let gone = tokio::spawn({
            let places = places.clone();
            async move { places.take(9).await }
        });
        while places.lock().waiting.len() < 5 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        drop(held);
        for w in waiting {
            w.await.unwrap();
        }
        drop(order_tx);
        let mut got = Vec::new();
        while let Some(name) = order.recv().await {
            got.push(name);
        }
        assert_eq!(got, ["long", "middle", "middle later", "short"]);
        assert_eq!(places.lock().free, 1);
        assert!(places.lock().waiting.is_empty());
    }
}
