//! A question name, read from the packet into the per-CPU scratch buffer, checked label by
//! label, turned into dotted form in place and hashed suffix by suffix from the right in
//! one bounded pass (the hash of `pipeguard_common::name_hash`).

use aya_ebpf::{helpers::generated::bpf_skb_load_bytes, programs::SkBuffContext};
use pipeguard_common::{
    DnsScratch, MAX_LABELS, MAX_NAME_BYTES, NAME_EXACT, NAME_HASH_SEED, NAME_WILDCARD, NameKey, NameRule,
    ascii_lower, name_hash_step,
};

use crate::maps::{DNS_NAMES, DNS_SCRATCH, SCRATCH_QUERY};

/// Index mask of `DnsScratch::name`, so the verifier sees every access in bounds.
const MASK: usize = 2 * MAX_NAME_BYTES - 1;
/// Wire name plus qtype and qclass.
const READ_BYTES: usize = MAX_NAME_BYTES + 4;

pub struct Name {
    /// The scratch buffer holding it: `name[0]` is '.', the name runs to `end`.
    pub scratch: *mut DnsScratch,
    pub end: usize,
    /// `name_hash` of the whole name.
    pub hash: u64,
    /// The question's type, when the bytes read reach past the name (they do for any
    /// question that fits in a packet): read with the name, not by a load of its own.
    pub qtype: Option<u16>,
    /// The scratch buffer's run count when this parse began (see `undisturbed`).
    pub run: u64,
}

impl Name {
    /// Bytes the name takes on the wire (its labels and the final zero byte).
    #[inline(always)]
    pub fn wire_len(&self) -> usize {
        self.end + 1
    }
}

/// The most specific rule of `policy_id` that allows the name, confirmed by its text.
pub struct Allowed {
    pub key: NameKey,
    pub rule: *const NameRule,
}

/// Reads and checks the name at `offset`: dotted form in the scratch record, and in
/// `scratch.hashes[p]` the hash of the suffix after each label boundary `p`.
#[inline(always)]
pub fn read(ctx: &SkBuffContext, offset: usize, slot: u32) -> Result<Name, ()> {
    let scratch = DNS_SCRATCH.get_ptr_mut(slot).ok_or(())?;
    let s = unsafe { &mut *scratch };
    let avail = (ctx.len() as usize).checked_sub(offset).ok_or(())?;
    let mut n = avail;
    if n > READ_BYTES {
        n = READ_BYTES;
    }
    if n == 0 {
        return Err(());
    }
    // Starts at 1 and never wraps: never 0 (an unmarked byte), never an earlier run's count.
    let run = unsafe { core::ptr::read_volatile(&raw const s.run) }.wrapping_add(1);
    unsafe { core::ptr::write_volatile(&raw mut s.run, run) };
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset as u32,
            s.event.name.as_mut_ptr().cast(),
            (n & 0x1ff) as u32,
        )
    };
    if rc != 0 {
        return Err(());
    }
    // Forward: where each label starts (marked), and where the name ends.
    let mut pos = 0usize;
    let mut labels = 0usize;
    let mut ok = true;
    while labels < MAX_LABELS {
        let len = s.event.name[pos & MASK] as usize;
        if len == 0 {
            break;
        }
        // 0xc0 is a compression pointer and 0x40/0x80 are extended label types: none
        // belongs in a query's question.
        // Checked before marking: every mark lies before `end`, so the backward pass
        // clears them all.
        if len > 63 || pos + len + 1 >= MAX_NAME_BYTES - 1 {
            ok = false;
            break;
        }
        s.starts[labels & (MAX_LABELS - 1)] = pos as u8;
        s.marks[pos & (MAX_NAME_BYTES - 1)] = run;
        pos += len + 1;
        labels += 1;
    }
    // The zero byte must be among the bytes read (the name is not cut short).
    if pos >= n {
        ok = false;
    }
    // Through memory: the verifier then checks the pass below once for every name, instead
    // of once per label count the forward pass could have ended with.
    unsafe {
        core::ptr::write_volatile(&raw mut s.labels, if ok { labels as u16 } else { 0 });
    }
    let end = opaque(s, pos) & (MAX_NAME_BYTES - 1);
    // Backward: hash from the right; each length byte becomes a dot, and the hash so far is
    // the hash of the suffix after it. Runs to the start even after a bad byte, so every
    // mark is cleared for the next name.
    let mut pos = end;
    let mut hash = NAME_HASH_SEED;
    let mut i = 0;
    while i < MAX_NAME_BYTES {
        if pos == 0 {
            break;
        }
        pos -= 1;
        // Opaque, so LLVM indexes afresh instead of walking a pointer down from past the
        // end of the array (which the verifier rejects).
        let at = opaque(s, pos) & (MAX_NAME_BYTES - 1);
        let b = s.event.name[at];
        if unsafe { core::ptr::read_volatile(&raw const s.marks[at]) } == run {
            s.marks[at] = 0;
            s.hashes[at] = hash;
            s.event.name[at] = b'.';
            hash = name_hash_step(hash, b'.');
        } else {
            // A dot inside a label would make the dotted form ambiguous.
            if b == b'.' {
                unsafe { core::ptr::write_volatile(&raw mut s.labels, 0) };
            }
            hash = name_hash_step(hash, b);
        }
        i += 1;
    }
    // 0: no labels, or a bad byte on the way.
    if unsafe { core::ptr::read_volatile(&raw const s.labels) } == 0 {
        return Err(());
    }
    // The type follows the name's zero byte at `end`.
    let qtype = if end + 3 <= n {
        Some(u16::from_be_bytes([
            s.event.name[(end + 1) & MASK],
            s.event.name[(end + 2) & MASK],
        ]))
    } else {
        None
    };
    Ok(Name {
        scratch,
        end,
        hash: s.hashes[0],
        qtype,
        run,
    })
}

/// No other run parsed a name in `name`'s buffer since it was read: what the buffer holds
/// is still this name. Asked after the last read a verdict depends on.
#[inline(always)]
pub fn undisturbed(name: &Name) -> bool {
    unsafe { core::ptr::read_volatile(&raw const (*name.scratch).run) == name.run }
}

/// Reads the name at `offset` and finds the rule of `policy_id` that allows it: an exact
/// rule for the full name, else the longest wildcard suffix with at least one label before
/// it. A hash hit only counts when the rule's text equals the name.
#[inline(always)]
pub fn check(ctx: &SkBuffContext, offset: usize, policy_id: u32) -> Result<(Name, Option<Allowed>), ()> {
    let name = read(ctx, offset, SCRATCH_QUERY)?;
    let s = unsafe { &mut *name.scratch };
    let mut key = NameKey {
        policy_id,
        kind: NAME_EXACT,
        hash: name.hash,
    };
    let mut from = 1;
    let mut rule = DNS_NAMES.get_ptr(&key);
    if rule.is_none() {
        // Longest suffix first: the first label boundary after the start.
        let labels = opaque(s, s.labels as usize);
        let mut j = 1;
        while j < MAX_LABELS {
            if j >= labels {
                break;
            }
            let at = s.starts[j & (MAX_LABELS - 1)] as usize & (MAX_NAME_BYTES - 1);
            key = NameKey {
                policy_id,
                kind: NAME_WILDCARD,
                hash: s.hashes[at],
            };
            rule = DNS_NAMES.get_ptr(&key);
            if rule.is_some() {
                from = at + 1;
                break;
            }
            j += 1;
        }
    }
    let Some(rule) = rule else {
        return Ok((name, None));
    };
    // Through memory, so the comparison is verified once, not once per way the search
    // above could have found its rule. The most specific candidate decides; should its
    // text differ (a hash collision), the name is refused, not tried on a broader rule.
    let from = opaque(s, from) & (MAX_NAME_BYTES - 1);
    if text_matches(s, from, name.end, unsafe { &*rule }) {
        // Interrupted, the text compared may not be this packet's: closed, not open.
        if !undisturbed(&name) {
            return Err(());
        }
        return Ok((name, Some(Allowed { key, rule })));
    }
    Ok((name, None))
}

/// `scratch.name[from..end]` equals the rule's name, ignoring ASCII case.
#[inline(always)]
fn text_matches(s: &mut DnsScratch, from: usize, end: usize, rule: &NameRule) -> bool {
    let Some(len) = end.checked_sub(from) else {
        return false;
    };
    if len != rule.len as usize {
        return false;
    }
    let len = opaque(s, len);
    let mut i = 0;
    while i < MAX_NAME_BYTES {
        if i >= len {
            return true;
        }
        if ascii_lower(s.event.name[(from + i) & MASK]) != rule.name[i & (MAX_NAME_BYTES - 1)] {
            return false;
        }
        i += 1;
    }
    false
}

/// `n`, through memory: LLVM can no longer prove a loop's constant bound redundant and drop
/// it, which would leave the verifier a loop it cannot see the end of.
#[inline(always)]
pub fn opaque(s: &mut DnsScratch, n: usize) -> usize {
    unsafe {
        core::ptr::write_volatile(&raw mut s.opaque, n as u16);
        core::ptr::read_volatile(&raw const s.opaque) as usize
    }
}
