//! Local pids, ports and references written from the words the VM keeps for them, instead of
//! by `enif_term_to_binary`, which costs 150-250 ns each (an allocation and a pass through the
//! VM's whole encoder): more than all the rest of a small message such as a `'$gen_call'`
//! with its `{Pid, Ref}`.
//!
//! Two things come from the VM, and both are checked rather than assumed:
//! - **This node's name and creation**, which the encoding of every local identifier carries.
//!   They change when the node starts or stops distribution (a restart under the same name
//!   gets a new creation), and the VM offers no cheap way to read them but to encode an
//!   identifier. So one local identifier is encoded by the VM, the name and creation in that
//!   encoding are kept per thread, and each walk checks they still hold with two pid
//!   comparisons ([`Bounds`], [`LocalIds`]).
//! - **The layout of the terms** (OTP 25, 64-bit, little-endian): the low 28 bits of a local
//!   pid's data hold its 15-bit number and 13-bit serial (the bits above them follow from
//!   those), a port's hold its number, and an ordinary or pid reference is a boxed thing whose
//!   first 32 bits after the header are a marker, then its three numbers. The first time, the
//!   identifiers the VM makes from chosen encodings must read back as the numbers they were
//!   made from, the VM must refuse to make pids and ports with numbers beyond those bits, and
//!   a fresh reference must encode as the VM encodes it ([`layout_agrees`]); then each time
//!   the node is read again, its identifier is compared with the VM's encoding of it; a pid
//!   reference, which no encoding makes, is compared the first time one is seen. If anything
//!   disagrees, every identifier goes to the VM, for the life of the VM.
//!
//! Magic references (`ets` tables, `atomics`), whose numbers live outside the term, always go
//! to the VM.
//!
//! Pids and references of other nodes ([`write_remote`]) name their node through the VM's
//! entry for it, which never changes its name or creation. The first one of a node is
//! encoded by the VM, and the node's encoding is kept per thread with the entry's address, and
//! with a copy of the identifier, which keeps the entry alive (so that no other node's entry
//! can take that address while it is kept).

use crate::term_word::{from_word, word};
use rustler::sys::{
    enif_alloc_env, enif_binary_to_term, enif_compare, enif_free_env, enif_make_copy,
    enif_make_ref, enif_release_binary, enif_term_to_binary, ErlNifBinary, ErlNifEnv, ErlNifTerm,
    ERL_NIF_BIN2TERM_SAFE,
};
use std::cell::{Cell, RefCell};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU8, Ordering};
use teleport_core::encode::Writer;
use teleport_core::etf::VERSION;

const NEW_PID_EXT: u8 = 88;
const NEW_PORT_EXT: u8 = 89;
const NEWER_REFERENCE_EXT: u8 = 90;
const V4_PORT_EXT: u8 = 120;

/// The low four bits of a local pid's word (`_TAG_IMMED1_PID`) and of a local port's.
const PID_TAG: usize = 0x3;
const PORT_TAG: usize = 0x7;
/// A pid's data: the number in the low 15 bits, the serial in the 13 above (and above those,
/// bits that follow from them).
const PID_NUM_BITS: u32 = 15;
const PID_SER_BITS: u32 = 13;
/// Bits of a pid's or a port's data that its encoding holds.
const ID_DATA_BITS: u32 = 28;
/// Header words of a reference thing (`_TAG_HEADER_REF`, arity in the bits above 6): an
/// ordinary or magic one has 2 words after the header, a pid reference 3.
const REF_HEADER: usize = (2 << 6) | 0x10;
const PID_REF_HEADER: usize = (3 << 6) | 0x10;
/// The low 32 bits of an ordinary (or pid) reference's first word; a magic one has a
/// pointer there.
const ORDINARY_MARKER: u32 = u32::MAX;

/// A local identifier as its term word tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Id {
    Pid { num: u32, ser: u32 },
    Port { num: u32 },
    Ref { nums: [u32; 3], pid_ref: bool },
}

/// What the term `t` is, if a local pid, port or non-magic reference.
///
/// # Safety
/// `t` must be a live term. Of a boxed term only the header is read, and the two words after
/// it only when the header says they are there.
unsafe fn classify(t: ErlNifTerm) -> Option<Id> {
    let w = word(t);
    let data = w >> 4;
    match w & 0xF {
        PID_TAG => Some(Id::Pid {
            num: (data & ((1 << PID_NUM_BITS) - 1)) as u32,
            ser: ((data >> PID_NUM_BITS) & ((1 << PID_SER_BITS) - 1)) as u32,
        }),
        PORT_TAG => Some(Id::Port {
            num: (data & ((1 << ID_DATA_BITS) - 1)) as u32,
        }),
        _ if w & 0x3 == 0x2 => {
            let thing = (w & !0x3) as *const usize;
            let pid_ref = match *thing {
                REF_HEADER => false,
                PID_REF_HEADER => true,
                _ => return None,
            };
            let (first, second) = (*thing.add(1), *thing.add(2));
            if first as u32 != ORDINARY_MARKER {
                return None; // a magic reference
            }
            let nums = [(first >> 32) as u32, second as u32, (second >> 32) as u32];
            Some(Id::Ref { nums, pid_ref })
        }
        _ => None,
    }
}

/// A node as the encoding of its identifiers names it: what comes before the numbers of a
/// pid, a port and a reference (tag, name and, for a reference, its length and creation), and
/// the creation that comes after those of a pid or port.
#[derive(Clone)]
struct NodeCoding {
    pid_head: Vec<u8>,
    port_head: Vec<u8>,
    ref_head: Vec<u8>,
    creation: [u8; 4],
}

impl NodeCoding {
    /// The node whose name is encoded as `atom` (tag and length included) and whose creation
    /// is `creation`.
    fn new(atom: &[u8], creation: [u8; 4]) -> NodeCoding {
        let head = |before: &[u8], after: &[u8]| [before, atom, after].concat();
        NodeCoding {
            pid_head: head(&[NEW_PID_EXT], &[]),
            port_head: head(&[NEW_PORT_EXT], &[]),
            ref_head: head(&[NEWER_REFERENCE_EXT, 0, 3], &creation),
            creation,
        }
    }

    /// The same name with another creation.
    fn with_creation(&self, creation: u32) -> NodeCoding {
        NodeCoding::new(&self.pid_head[1..], creation.to_be_bytes())
    }

    /// Read from the VM's encoding of a local identifier (version byte first): the node's
    /// atom follows the tag (and a reference's 16-bit length), the creation follows the
    /// numbers of a pid or port and precedes those of a reference.
    fn from_encoding(bytes: &[u8]) -> Option<NodeCoding> {
        let (tag, at) = match bytes {
            [VERSION, NEWER_REFERENCE_EXT, ..] => (NEWER_REFERENCE_EXT, 4),
            [VERSION, tag @ (NEW_PID_EXT | NEW_PORT_EXT), ..] => (*tag, 2),
            _ => return None,
        };
        let atom_len = match *bytes.get(at)? {
            // ATOM_EXT and ATOM_UTF8_EXT: a 16-bit length; SMALL_ATOM_EXT and its UTF-8 twin: 8.
            100 | 118 => {
                3 + u16::from_be_bytes([*bytes.get(at + 1)?, *bytes.get(at + 2)?]) as usize
            }
            115 | 119 => 2 + *bytes.get(at + 1)? as usize,
            _ => return None,
        };
        let after = at + atom_len;
        let creation_at = match tag {
            NEW_PID_EXT => after + 8,
            NEW_PORT_EXT => after + 4,
            _ => after,
        };
        let creation = bytes.get(creation_at..creation_at + 4)?.try_into().ok()?;
        Some(NodeCoding::new(bytes.get(at..after)?, creation))
    }

    /// The head and the rest of `id`'s encoding (without the version byte).
    #[inline]
    fn parts(&self, id: Id, rest: &mut [u8; 12]) -> (&[u8], usize) {
        let c = self.creation;
        match id {
            Id::Pid { num, ser } => {
                rest[..4].copy_from_slice(&num.to_be_bytes());
                rest[4..8].copy_from_slice(&ser.to_be_bytes());
                rest[8..].copy_from_slice(&c);
                (&self.pid_head, 12)
            }
            Id::Port { num } => {
                rest[..4].copy_from_slice(&num.to_be_bytes());
                rest[4..8].copy_from_slice(&c);
                (&self.port_head, 8)
            }
            Id::Ref { nums, .. } => {
                for (i, n) in nums.into_iter().enumerate() {
                    rest[i * 4..i * 4 + 4].copy_from_slice(&n.to_be_bytes());
                }
                (&self.ref_head, 12)
            }
        }
    }

    /// Writes `id` as the VM would (without the version byte).
    #[inline]
    fn write(&self, id: Id, w: &mut Writer) {
        let mut rest = [0; 12];
        let (head, n) = self.parts(id, &mut rest);
        w.raw(head);
        w.raw(&rest[..n]);
    }

    /// Whether `vm` (version byte first) is `id`'s encoding as written here.
    fn same(&self, id: Id, vm: &[u8]) -> bool {
        let mut rest = [0; 12];
        let (head, n) = self.parts(id, &mut rest);
        let body = vm.get(1..).unwrap_or_default();
        vm.first() == Some(&VERSION)
            && body.len() == head.len() + n
            && body.starts_with(head)
            && body[head.len()..] == rest[..n]
    }

    /// The term `id` decodes to, written with this node's name and creation; `None` if the VM
    /// refuses it.
    ///
    /// # Safety
    /// `env` must be a live env of the calling thread.
    unsafe fn decodes_to(&self, env: *mut ErlNifEnv, id: Id) -> Option<ErlNifTerm> {
        let mut rest = [0; 12];
        let (head, n) = self.parts(id, &mut rest);
        let bytes = [&[VERSION], head, &rest[..n]].concat();
        let mut t = ErlNifTerm::default();
        let used = enif_binary_to_term(
            env,
            bytes.as_ptr(),
            bytes.len(),
            &mut t,
            ERL_NIF_BIN2TERM_SAFE,
        );
        (used == bytes.len()).then_some(t)
    }
}

/// Calls `f` with the VM's encoding of `t` (version byte first).
///
/// # Safety
/// `env` must be live and `t` a term of it.
pub unsafe fn with_vm_encoding<R>(
    env: *mut ErlNifEnv,
    t: ErlNifTerm,
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    let mut bin = MaybeUninit::<ErlNifBinary>::uninit();
    if enif_term_to_binary(env, t, bin.as_mut_ptr()) == 0 {
        // Only out of memory makes this fail, and then the VM is already going down.
        panic!("enif_term_to_binary failed");
    }
    let mut bin = bin.assume_init();
    let result = f(std::slice::from_raw_parts(bin.data, bin.size));
    enif_release_binary(&mut bin);
    result
}

/// Whether the layout this module reads is the VM's: pids, ports and references it makes from
/// chosen encodings (extreme numbers included) are read back as those numbers, and a fresh
/// reference is written as the VM writes it.
///
/// # Safety
/// `env` must be a live env of the calling thread.
unsafe fn layout_agrees(env: *mut ErlNifEnv, node: &NodeCoding) -> bool {
    if !(cfg!(target_pointer_width = "64") && cfg!(target_endian = "little")) {
        return false;
    }
    let max_num = (1 << PID_NUM_BITS) - 1;
    let max_ser = (1 << PID_SER_BITS) - 1;
    let ids = [
        Id::Pid { num: 0, ser: 0 },
        Id::Pid { num: 1, ser: 0 },
        Id::Pid {
            num: max_num,
            ser: max_ser,
        },
        Id::Pid {
            num: 0x1234,
            ser: 0x0ABC,
        },
        Id::Port { num: 0 },
        Id::Port {
            num: (1 << ID_DATA_BITS) - 1,
        },
        Id::Port { num: 0x0123_4567 },
        Id::Ref {
            nums: [0, 0, 0],
            pid_ref: false,
        },
        Id::Ref {
            nums: [1, 2, 3],
            pid_ref: false,
        },
        Id::Ref {
            nums: [0x3_FFFF, u32::MAX, u32::MAX],
            pid_ref: false,
        },
        Id::Ref {
            nums: [0x2_5A5A, 0xDEAD_BEEF, 0x0102_0304],
            pid_ref: false,
        },
    ];
    let read_back = |id| node.decodes_to(env, id).and_then(|t| classify(t)) == Some(id);
    if !ids.into_iter().all(read_back) {
        return false;
    }
    // Numbers the bits read here cannot hold: a VM that makes such a pid or port of this node
    // has another layout (the bits above them are not only what follows from them).
    let beyond = [
        Id::Pid {
            num: max_num + 1,
            ser: 0,
        },
        Id::Pid {
            num: 0,
            ser: max_ser + 1,
        },
    ];
    if beyond
        .into_iter()
        .any(|id| node.decodes_to(env, id).is_some())
    {
        return false;
    }
    let wide_port = [
        &[VERSION, V4_PORT_EXT][..],
        &node.pid_head[1..],
        &(1u64 << ID_DATA_BITS).to_be_bytes(),
        &node.creation,
    ]
    .concat();
    let mut t = ErlNifTerm::default();
    let flags = ERL_NIF_BIN2TERM_SAFE;
    if enif_binary_to_term(env, wide_port.as_ptr(), wide_port.len(), &mut t, flags) != 0 {
        return false;
    }
    let fresh = enif_make_ref(env);
    let Some(id) = classify(fresh) else {
        return false;
    };
    with_vm_encoding(env, fresh, |vm| node.same(id, vm))
}

/// Something this module checks against the VM before relying on it, and what it found:
/// nothing yet, that it holds, or that it does not (for the life of the VM).
struct Check {
    state: AtomicU8,
    /// The event logged, once, when it does not hold.
    event: &'static str,
}

const UNKNOWN: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;

impl Check {
    const fn new(event: &'static str) -> Check {
        Check {
            state: AtomicU8::new(UNKNOWN),
            event,
        }
    }

    fn state(&self) -> u8 {
        self.state.load(Ordering::Relaxed)
    }

    fn is(&self, state: u8) -> bool {
        self.state() == state
    }

    /// Records whether it holds, and returns whether it does now: never again once it did
    /// not (a disagreement another thread found stands). The first time it does not, says
    /// why.
    fn settle(&self, holds: bool, reason: &'static str) -> bool {
        if holds {
            let was =
                self.state
                    .compare_exchange(UNKNOWN, ON, Ordering::Relaxed, Ordering::Relaxed);
            return was.map_or_else(|state| state == ON, |_| true);
        }
        if self.state.swap(OFF, Ordering::Relaxed) != OFF {
            tracing::warn!(reason, "{}", self.event);
        }
        false
    }

    /// Whether it holds: what was found, or else what `compare` finds now (recorded).
    fn ask(&self, compare: impl FnOnce() -> bool, reason: &'static str) -> bool {
        match self.state() {
            ON => true,
            OFF => false,
            _ => self.settle(compare(), reason),
        }
    }
}

/// Whether this module writes local identifiers at all (checked on the first one).
static LAYOUT: Check = Check::new("codec_identifiers_by_vm");
/// Whether pid references are written here (checked on the first one seen).
static PID_REFS: Check = Check::new("codec_pid_refs_by_vm");
/// Whether [`Bounds`] tell this node's name and creation (checked on the first ones made).
static BOUNDS: Check = Check::new("codec_node_asked_each_call");
/// Whether identifiers of other nodes are written here (checked on each node's first).
static REMOTE: Check = Check::new("codec_remote_identifiers_by_vm");
/// Whether references of other nodes are (checked on the first one written from a kept node).
static REMOTE_REFS: Check = Check::new("codec_remote_refs_by_vm");

/// Each check this module makes and its outcome so far (`unchecked`, `on` or `off`), for
/// `teleport_nif:diag_local_ids/0`: tests use it to see that identifiers are written here
/// and that the node is kept between calls.
pub fn checks() -> [(&'static str, &'static str); 5] {
    let say = |check: &Check| match check.state() {
        ON => "on",
        OFF => "off",
        _ => "unchecked",
    };
    [
        ("layout", say(&LAYOUT)),
        ("bounds", say(&BOUNDS)),
        ("pid_refs", say(&PID_REFS)),
        ("remote", say(&REMOTE)),
        ("remote_refs", say(&REMOTE_REFS)),
    ]
}

/// The pid `<0.0.0>` of whatever node this is now.
const PID_ZERO: usize = PID_TAG;

/// Two pids of a node that this node is not, which tell in two comparisons whether this node
/// still has the name and creation they were made from: pids compare by their data, then by
/// their node's name, then by its creation, so `<0.0.0>` sorts strictly between `<0.0.0>` of
/// that name at creation - 1 and at creation + 1 exactly when this node has that name and
/// that creation. (Checked when the first bounds are made, [`Bounds::tell`].) A node with
/// creation 0 (not distributed) or `u32::MAX` has none: each walk then has the VM encode its
/// first identifier, and compares.
struct Bounds {
    /// A process-independent env holding the two pids.
    env: *mut ErlNifEnv,
    below: ErlNifTerm,
    above: ErlNifTerm,
}

impl Bounds {
    /// The bounds of the node `node` names, if it has any.
    ///
    /// # Safety
    /// Must run on a thread of the VM.
    unsafe fn around(node: &NodeCoding) -> Option<Bounds> {
        let creation = u32::from_be_bytes(node.creation);
        let (lo, hi) = (creation.checked_sub(1)?, creation.checked_add(1)?);
        let env = enif_alloc_env();
        let zero = Id::Pid { num: 0, ser: 0 };
        // Each must be a pid of another node: the VM decodes creation 0 of this node's name
        // as this node.
        let pid_at = |creation: u32| {
            node.with_creation(creation)
                .decodes_to(env, zero)
                .filter(|t| classify(*t).is_none())
        };
        match (pid_at(lo), pid_at(hi)) {
            (Some(below), Some(above)) => Some(Bounds { env, below, above }),
            _ => {
                enif_free_env(env);
                None
            }
        }
    }

    /// Whether this node still has the name and creation these bounds were made from.
    ///
    /// # Safety
    /// Must run on a thread of the VM.
    #[inline]
    unsafe fn hold(&self) -> bool {
        let zero = from_word(PID_ZERO);
        enif_compare(zero, self.below) > 0 && enif_compare(zero, self.above) < 0
    }

    /// Whether bounds tell this node: those of `node` (this node, just read from the VM)
    /// hold, and those of the same name at another creation, and of another name, do not.
    ///
    /// # Safety
    /// Must run on a thread of the VM, in which `node` is this node.
    unsafe fn tell(node: &NodeCoding, these: &Bounds) -> bool {
        let creation = u32::from_be_bytes(node.creation);
        // Bounds around another creation of this name (two apart, so that neither bound is
        // this node's).
        let other = creation.checked_add(2).or(creation.checked_sub(2));
        let Some(later) = other.map(|c| node.with_creation(c)) else {
            return false;
        };
        // `nonode@nohost` exists in every VM (no atom is made) and is no distributed node.
        let name = b"nonode@nohost";
        let other_name = NodeCoding::new(
            &[&[100, 0, name.len() as u8], &name[..]].concat(),
            node.creation,
        );
        let refuted = |n: &NodeCoding| match Bounds::around(n) {
            Some(b) => !b.hold(),
            None => false,
        };
        these.hold() && refuted(&later) && refuted(&other_name)
    }
}

impl Drop for Bounds {
    fn drop(&mut self) {
        unsafe { enif_free_env(self.env) };
    }
}

/// This node, with its bounds when it has them: what a thread keeps between walks.
struct Cached {
    node: NodeCoding,
    bounds: Option<Bounds>,
}

thread_local! {
    /// This node as this thread last read it, used again while its bounds hold.
    static THIS: Cell<Option<Box<Cached>>> = const { Cell::new(None) };
}

/// What one walk knows of this node; gives it back to its thread when dropped.
///
/// The node's name and creation come from the VM's encoding of a local identifier, and are
/// used again by later walks on the same thread as long as its [`Bounds`] hold (two
/// comparisons) or, without bounds, as long as the VM's encoding of each walk's first
/// identifier matches; so a node that is renamed, or restarts its distribution, is never
/// written under its old name.
#[derive(Default)]
pub struct LocalIds(Known);

#[derive(Default)]
enum Known {
    /// No local identifier seen yet in this walk.
    #[default]
    Unknown,
    /// This node, checked for this walk.
    Node(Box<Cached>),
    /// The VM writes every identifier.
    Vm,
}

impl LocalIds {
    /// Writes `t` if it is a local pid, port or non-magic reference: here when this node is
    /// known, else as the VM encodes it (which tells this node for the rest of the walk, and
    /// for later walks while it holds). `false`: nothing was written, the VM must write it.
    ///
    /// # Safety
    /// `env` must be a live env of the calling thread and `t` a term of it.
    #[inline]
    pub unsafe fn write(&mut self, env: *mut ErlNifEnv, t: ErlNifTerm, w: &mut Writer) -> bool {
        let Some(id) = classify(t) else {
            return false;
        };
        if let Known::Unknown = self.0 {
            match THIS.with(|c| c.take()) {
                // Both checks read again: another thread may have found a disagreement.
                Some(kept)
                    if LAYOUT.is(ON)
                        && BOUNDS.is(ON)
                        && kept.bounds.as_ref().is_some_and(|b| b.hold()) =>
                {
                    self.0 = Known::Node(kept);
                }
                kept => {
                    self.0 = with_vm_encoding(env, t, |vm| {
                        w.raw(&vm[1..]);
                        learn(env, vm, id, kept)
                    });
                    return true;
                }
            }
        }
        match &self.0 {
            Known::Node(cached) => {
                let node = &cached.node;
                if let Id::Ref { pid_ref: true, .. } = id {
                    // On the first one seen: whether ours is the VM's encoding of it.
                    let ours = || with_vm_encoding(env, t, |vm| node.same(id, vm));
                    let reason =
                        "a pid reference read from its term words does not encode as the VM's";
                    if !PID_REFS.ask(ours, reason) {
                        return false;
                    }
                }
                node.write(id, w);
                true
            }
            Known::Vm | Known::Unknown => false,
        }
    }
}

impl Drop for LocalIds {
    fn drop(&mut self) {
        if let Known::Node(cached) = std::mem::take(&mut self.0) {
            THIS.with(|c| c.set(Some(cached)));
        }
    }
}

/// What a walk knows once the VM encoded `id` as `vm`: this node, if the layout is the one
/// this module reads (checked the first time, then by comparing ours with `vm`), with its
/// bounds if it has any and they are known to tell. `kept`, what the thread knew before, is
/// this node still if it writes `id` as `vm` (a node without bounds is told so, each walk).
///
/// # Safety
/// `env` must be a live env of the calling thread.
unsafe fn learn(env: *mut ErlNifEnv, vm: &[u8], id: Id, kept: Option<Box<Cached>>) -> Known {
    let layout = LAYOUT.state();
    if layout == OFF {
        return Known::Vm;
    }
    let comparable = !matches!(id, Id::Ref { pid_ref: true, .. }) || PID_REFS.is(ON);
    if let Some(kept) = kept.filter(|k| comparable && k.node.same(id, vm)) {
        return Known::Node(kept);
    }
    let Some(node) = NodeCoding::from_encoding(vm) else {
        LAYOUT.settle(
            false,
            "the VM's encoding of a local identifier is not the expected one",
        );
        return Known::Vm;
    };
    let agrees = match id {
        // A pid reference is checked apart (`PID_REFS`, on the first one written).
        Id::Ref { pid_ref: true, .. } => true,
        _ => node.same(id, vm),
    };
    let holds = agrees && (layout == ON || layout_agrees(env, &node));
    if !LAYOUT.settle(
        holds,
        "identifiers read from their term words do not encode as the VM's",
    ) {
        return Known::Vm;
    }
    let bounds = match BOUNDS.state() {
        OFF => None,
        known => Bounds::around(&node).filter(|b| {
            known == ON
                || BOUNDS.settle(
                    Bounds::tell(&node, b),
                    "pids do not sort by node name and creation as expected",
                )
        }),
    };
    Known::Node(Box::new(Cached { node, bounds }))
}

/// The header word of a pid of another node (`_TAG_HEADER_EXTERNAL_PID`, 3 words after it: the
/// node's entry, an off-heap link, then the number and serial).
const EXTERNAL_PID_HEADER: usize = (3 << 6) | 0x30;
/// The header word of a reference of another node with 3 numbers (`_TAG_HEADER_EXTERNAL_REF`,
/// 4 words after it: the node's entry, an off-heap link, then the count of numbers and the
/// numbers, 32 bits each).
const EXTERNAL_REF3_HEADER: usize = (4 << 6) | 0x38;

/// The address of the VM's entry for the node of `t`, and `t`'s numbers, if `t` is a pid of
/// another node or a reference of another node with 3 numbers.
///
/// # Safety
/// `t` must be a live term. Of a boxed term only the header is read, and the words after it
/// only when the header says they are there.
unsafe fn classify_remote(t: ErlNifTerm) -> Option<(usize, Id)> {
    let w = word(t);
    if w & 0x3 != 0x2 {
        return None;
    }
    let thing = (w & !0x3) as *const usize;
    match *thing {
        EXTERNAL_PID_HEADER => {
            let data = *thing.add(3);
            let (num, ser) = (data as u32, (data >> 32) as u32);
            Some((*thing.add(1), Id::Pid { num, ser }))
        }
        EXTERNAL_REF3_HEADER => {
            let (first, second) = (*thing.add(3), *thing.add(4));
            if first as u32 != 3 {
                return None;
            }
            let nums = [(first >> 32) as u32, second as u32, (second >> 32) as u32];
            Some((
                *thing.add(1),
                Id::Ref {
                    nums,
                    pid_ref: false,
                },
            ))
        }
        _ => None,
    }
}

/// Another node as one thread knows it: its entry's address, a process-independent env
/// holding a copy of one of its identifiers (which keeps the entry alive), and its encoding.
struct Remote {
    entry: usize,
    keep: *mut ErlNifEnv,
    node: NodeCoding,
}

impl Drop for Remote {
    fn drop(&mut self) {
        unsafe { enif_free_env(self.keep) };
    }
}

/// Nodes kept per thread: a few, looked up by their entry's address.
const REMOTE_SLOTS: usize = 8;

thread_local! {
    static REMOTES: RefCell<[Option<Remote>; REMOTE_SLOTS]> = const {
        RefCell::new([const { None }; REMOTE_SLOTS])
    };
}

/// Writes `t` if it is a pid of another node or a reference of another node with 3 numbers:
/// here if this thread knows its node, else as the VM encodes it (and the node is kept).
/// `false`: nothing was written, the VM must write it.
///
/// # Safety
/// `env` must be a live env of the calling thread and `t` a term of it.
pub unsafe fn write_remote(env: *mut ErlNifEnv, t: ErlNifTerm, w: &mut Writer) -> bool {
    if REMOTE.is(OFF) {
        return false;
    }
    let Some((entry, id)) = classify_remote(t) else {
        return false;
    };
    let mut written = true;
    REMOTES.with(|slots| {
        let mut slots = slots.borrow_mut();
        let slot = &mut slots[(entry >> 6) % REMOTE_SLOTS];
        if let Some(known) = slot.as_ref().filter(|r| r.entry == entry) {
            // The first reference of another node written here is compared with the VM's
            // encoding (a node is often learned from a pid, the references' layout not).
            let ours = || with_vm_encoding(env, t, |vm| known.node.same(id, vm));
            let reason =
                "a reference of another node read from its term words does not encode as the VM's";
            written = !matches!(id, Id::Ref { .. }) || REMOTE_REFS.ask(ours, reason);
            if written {
                known.node.write(id, w);
            }
            return;
        }
        with_vm_encoding(env, t, |vm| {
            w.raw(&vm[1..]);
            let node = NodeCoding::from_encoding(vm).filter(|node| node.same(id, vm));
            let reason = "an identifier of another node read from its term words does not encode as the VM's";
            if let (true, Some(node)) = (REMOTE.settle(node.is_some(), reason), node) {
                let keep = enif_alloc_env();
                enif_make_copy(keep, t);
                *slot = Some(Remote { entry, keep, node });
            }
        });
    });
    written
}
