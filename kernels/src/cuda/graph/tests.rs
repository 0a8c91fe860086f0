//! Host-side logic of graphs: buckets, when a key is captured and replayed,
//! padding and the fixed layout of a persistent step.

use super::*;

#[test]
fn a_batch_takes_the_smallest_bucket_that_holds_it() {
    let b = Buckets::decode(64);
    assert_eq!(b.sizes()[..5], [1, 2, 4, 8, 16]);
    assert_eq!(*b.sizes().last().unwrap(), 64);
    assert_eq!(b.bucket_for(0), None);
    assert_eq!(b.bucket_for(1), Some(1));
    assert_eq!(b.bucket_for(3), Some(4));
    assert_eq!(b.bucket_for(8), Some(8));
    assert_eq!(b.bucket_for(9), Some(16));
    assert_eq!(b.bucket_for(64), Some(64));
    assert_eq!(b.bucket_for(65), None, "past the largest: eager");
    assert_eq!(Buckets::decode(3).sizes(), [1, 2]);
    assert!(Buckets::new(vec![]).is_err());
    assert!(Buckets::new(vec![0, 4]).is_err());
    assert_eq!(Buckets::new(vec![8, 2, 8]).unwrap().sizes(), [2, 8]);
}

#[test]
fn the_key_rounds_the_context_up_to_a_power_of_two_of_pages() {
    let b = Buckets::decode(16);
    let k = GraphKey::for_step(&b, 5, 1).unwrap();
    assert_eq!((k.rows, k.kv_pages, k.kv_ceiling()), (8, 1, 16));
    assert_eq!(GraphKey::for_step(&b, 5, 16).unwrap().kv_pages, 1);
    assert_eq!(GraphKey::for_step(&b, 5, 17).unwrap().kv_pages, 2);
    assert_eq!(GraphKey::for_step(&b, 5, 49).unwrap().kv_pages, 4);
    assert_eq!(GraphKey::for_step(&b, 5, 0).unwrap().kv_pages, 1);
    assert_eq!(GraphKey::for_step(&b, 17, 16), None);
}

#[test]
fn a_key_warms_up_then_is_captured_once_then_replayed() {
    let mut c: GraphCache<usize, &str> = GraphCache::new(2);
    assert_eq!(c.decide(None), Action::Eager);
    assert_eq!(c.decide(Some(8)), Action::Eager);
    assert_eq!(c.decide(Some(8)), Action::Eager);
    assert_eq!(c.decide(Some(8)), Action::Capture);
    // Not stored yet (the capture is in flight or was abandoned): again.
    assert_eq!(c.decide(Some(8)), Action::Capture);
    c.store(8, Some("g8"));
    assert_eq!(c.decide(Some(8)), Action::Replay);
    assert_eq!(c.get(&8), Some(&"g8"));
    assert_eq!(c.decide(Some(4)), Action::Eager, "keys are independent");
    c.decide(Some(4));
    assert_eq!(c.decide(Some(4)), Action::Capture);
    c.store(4, None);
    assert_eq!(c.decide(Some(4)), Action::Eager, "a failed capture: eager");
    assert_eq!(c.get(&4), None);
    assert_eq!(c.captured(), 1);
    c.clear();
    assert_eq!(c.captured(), 0);
    assert_eq!(c.decide(Some(8)), Action::Eager, "warms up again");
    let mut now: GraphCache<u8, ()> = GraphCache::new(0);
    assert_eq!(now.decide(Some(1)), Action::Capture);
}

fn three_rows() -> StepArrays {
    StepArrays {
        tokens: vec![5, 6, 7],
        positions: vec![40, 41, 3],
        slots: vec![40, 41, 19],
        kv_len: vec![41, 42, 4],
        table_off: vec![0, 0, 3],
        tables: vec![9, 4, 2, 1],
        logit_rows: vec![0, 1, 2],
    }
}

#[test]
fn padding_rows_read_token_zero_and_write_the_padding_slot() {
    let cap = StepCapacity { rows: 4, tables: 8 };
    let p = pad_step(&three_rows(), &cap, 16 * 30 + 5).unwrap();
    assert_eq!(p.tokens, [5, 6, 7, 0]);
    assert_eq!(p.positions[3], 0);
    assert_eq!(p.slots[3], 485);
    assert_eq!(p.kv_len[3], 1);
    assert_eq!(p.table_off[3], 4, "the padding entry follows the tables");
    assert_eq!(p.tables, [9, 4, 2, 1, 30, 30, 30, 30]);
    assert_eq!(p.logit_rows, [0, 1, 2, 3]);
    let packed = pack_fixed(&p, &cap).unwrap();
    assert_eq!(packed.len(), cap.len());
    let o = cap.offsets();
    assert_eq!(packed[o[1]..o[1] + 4], [40, 41, 3, 0]);
    assert_eq!(packed[o[5]..o[5] + 4], [9, 4, 2, 1]);
    assert_eq!(packed[o[6]..], [0, 1, 2, 3]);
    // Unpadded input does not pack; too large a step does not pad.
    assert!(pack_fixed(&three_rows(), &cap).is_err());
    let full = StepCapacity { rows: 2, tables: 8 };
    assert!(pad_step(&three_rows(), &full, 0).is_err());
    let no_room = StepCapacity { rows: 4, tables: 4 };
    assert!(
        pad_step(&three_rows(), &no_room, 0).is_err(),
        "no padding entry"
    );
    // An empty step is all padding (the buffer before the first refill).
    let e = pad_step(&StepArrays::default(), &cap, 7).unwrap();
    assert_eq!(e.kv_len, [1; 4]);
    assert_eq!(e.table_off, [0; 4]);
}

#[test]
fn a_refill_stays_within_the_captured_limits() {
    let lim = StepLimits {
        vocab: 8,
        slots: 16 * 16,
        kv_len: 64,
        pad_slot: 16 * 15,
    };
    assert!(lim.check(&three_rows()).is_ok());
    let mut a = three_rows();
    a.tokens[0] = 8;
    assert!(lim.check(&a).is_err(), "token past the vocabulary");
    let mut a = three_rows();
    a.kv_len[1] = 65;
    assert!(lim.check(&a).is_err(), "past the plan's context ceiling");
    a.kv_len[1] = 64;
    assert!(lim.check(&a).is_ok());
    let mut a = three_rows();
    a.tables[0] = 16;
    assert!(lim.check(&a).is_err(), "block outside the cache");
    let mut a = three_rows();
    a.slots[2] = 256;
    assert!(lim.check(&a).is_err(), "slot outside the cache");
    let mut a = three_rows();
    a.kv_len[2] = 0;
    assert!(lim.check(&a).is_err());
    let bad_pad = StepLimits {
        pad_slot: 256,
        ..lim
    };
    assert!(bad_pad.check(&three_rows()).is_err());
}

#[test]
fn a_failed_capture_is_refused_until_cleared() {
    let mut c: GraphCache<u8, ()> = GraphCache::new(0);
    assert_eq!(c.decide(Some(3)), Action::Capture);
    assert!(!c.is_refused(&3));
    c.store(3, None);
    assert!(c.is_refused(&3) && !c.is_refused(&4));
    assert_eq!(c.decide(Some(3)), Action::Eager);
    c.clear();
    assert!(
        !c.is_refused(&3),
        "a regrown workspace gives the capture another try"
    );
    assert_eq!(c.decide(Some(3)), Action::Capture);
}
