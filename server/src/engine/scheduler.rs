//! Batch planning, kept free of model types so the policy is easy to test.
//!
//! Each step runs every decoding sequence (one token each) and fills what is left of the
//! token budget with prefill chunks, oldest request first. Decodes come first because they
//! are what streaming clients are waiting on; a long prompt is split across steps so it
//! cannot stall them. Admission to the running set is first-in first-out and needs all of a
//! request's `n` slots at once (forking after the prompt must never wait for a slot).

/// Chunk lengths for the prefilling requests, in order (0: not this step).
pub fn plan_prefill(budget: usize, decodes: usize, remaining: &[usize]) -> Vec<usize> {
    let mut left = budget.saturating_sub(decodes);
    remaining
        .iter()
        .map(|&r| {
            let take = r.min(left);
            left -= take;
            take
        })
        .collect()
}

/// How many requests from the front of the queue fit into `free` slots, given each one's
/// slot need. Stops at the first that does not fit so no request is overtaken forever.
pub fn admit(free: usize, needs: impl IntoIterator<Item = usize>) -> usize {
    let mut free = free;
    let mut count = 0;
    for need in needs {
        if need > free {
            break;
        }
        free -= need;
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_first_then_prefill_chunks_in_order() {
        assert_eq!(plan_prefill(10, 3, &[4, 5, 2]), vec![4, 3, 0]);
        assert_eq!(
            plan_prefill(10, 12, &[4]),
            vec![0],
            "decodes alone exceed the budget"
        );
        assert_eq!(
            plan_prefill(512, 0, &[2000]),
            vec![512],
            "long prompts are chunked"
        );
    }

    #[test]
    fn admission_is_fifo_and_all_or_nothing_per_request() {
        assert_eq!(admit(3, [1, 2, 1]), 2);
        assert_eq!(admit(3, [4, 1]), 0, "the head is not overtaken");
        assert_eq!(admit(0, [1]), 0);
    }
}
