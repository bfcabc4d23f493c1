//! Fuzz target for topic-name validation (`keys::validate_topic`, through
//! `forgemq::__fuzz`).
//!
//! Properties, for any string: no panic, and a name is accepted exactly when it is 1–200
//! bytes of `[A-Za-z0-9._:-]` (so it can't break the `{topic}` hash tag, use the `#`
//! reserved for partitions, or hold spaces and control characters). Names built from the
//! allowed alphabet alone are generated too, so the length bounds get exercised.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':')
}

fn expected(name: &str) -> bool {
    (1..=200).contains(&name.len()) && name.bytes().all(allowed)
}

fn check(name: &str) {
    let accepted = forgemq::__fuzz::validate_topic(name);
    assert_eq!(
        accepted,
        expected(name),
        "validate_topic({name:?}) = {accepted} ({} bytes)",
        name.len()
    );
    if accepted {
        assert!(!name.is_empty() && name.len() <= 200);
        assert!(name.bytes().all(allowed), "accepted {name:?}");
    }
}

fuzz_target!(|bytes: &[u8]| {
    // Any UTF-8 (lossy, so every input gives a string).
    check(&String::from_utf8_lossy(bytes));
    // Bytes mapped onto the allowed alphabet plus a few near misses, repeated to reach
    // the length limit: the first byte picks how many copies.
    const ALPHABET: &[u8] = b"abcxyzABCXYZ0189._:-#{} \t\n/\\*?";
    if let Some((&n, rest)) = bytes.split_first() {
        let mapped: String = rest
            .iter()
            .map(|&b| char::from(ALPHABET[usize::from(b) % ALPHABET.len()]))
            .collect();
        let repeated = mapped.repeat(usize::from(n % 8) + 1);
        check(&mapped);
        check(&repeated);
        // Only allowed characters: accepted iff 1-200 bytes.
        let clean: String = repeated.chars().filter(|c| allowed(*c as u8)).collect();
        check(&clean);
    }
});
