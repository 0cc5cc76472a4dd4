//! The policy generation: user space moves it after every write to the pod table or an
//! allowlist, and a socket's remembered verdict (the kernel's fast path, see
//! pipeguard-ebpf's `fast`) only counts while the generation it was judged under is current.
//! So a policy change, in place or by a new id, is judged again at every socket's next
//! attempt or packet.

use aya::maps::{Array, MapData};
use pipeguard_common::{POLICY_GENERATION_NONE, map_names};

use super::{Engine, EngineError, tables::map_error};

impl Engine {
    /// After any write to the pod table or an allowlist, failed or partial ones included:
    /// moves the policy generation, so every verdict a socket remembers is judged again on
    /// its next use (a revoked allow cuts an established connection at its next packet).
    pub(super) fn after_write<T>(&mut self, written: Result<T, EngineError>) -> Result<T, EngineError> {
        let bumped = self.bump_generation();
        let value = written?;
        bumped?;
        Ok(value)
    }

    /// The policy generation now: what a socket's remembered verdicts are dated by.
    pub fn policy_generation(&mut self) -> Result<u64, EngineError> {
        let array: Array<&mut MapData, u64> = self.map_mut(map_names::POLICY_GENERATION)?;
        array.get(&0, 0).map_err(map_error(map_names::POLICY_GENERATION))
    }

    /// Adds one to the policy generation (index 0 of its array; user space is its only
    /// writer). Skips 0, which means "nothing remembered".
    pub(super) fn bump_generation(&mut self) -> Result<(), EngineError> {
        let mut array: Array<&mut MapData, u64> = self.map_mut(map_names::POLICY_GENERATION)?;
        let now = array
            .get(&0, 0)
            .map_err(map_error(map_names::POLICY_GENERATION))?;
        let next = match now.wrapping_add(1) {
            POLICY_GENERATION_NONE => 1,
            next => next,
        };
        array
            .set(0, next, 0)
            .map_err(map_error(map_names::POLICY_GENERATION))
    }
}
