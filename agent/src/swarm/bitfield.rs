//! Which pieces of a blob a node holds: one bit per piece, in 64-bit words (piece `i` is bit `i % 64` of word
//! `i / 64`), with the count of set bits kept as they change. The wire form is the words; one received from a peer
//! is checked ([`Bitfield::from_words`]) before anything reads it.

/// A set of piece indexes in `[0, len)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bitfield {
    words: Vec<u64>,
    len: u64,
    ones: u64,
}

impl Bitfield {
    /// No piece of `len`.
    pub fn new(len: u64) -> Self {
        Self { words: vec![0; len.div_ceil(64) as usize], len, ones: 0 }
    }

    /// Every piece of `len`.
    pub fn full(len: u64) -> Self {
        let mut b = Self { words: vec![u64::MAX; len.div_ceil(64) as usize], len, ones: len };
        b.clear_tail();
        b
    }

    /// Pieces `[0, prefix)` of `len`.
    pub fn prefix(len: u64, prefix: u64) -> Self {
        let mut b = Self::new(len);
        for i in 0..prefix.min(len) {
            b.set(i);
        }
        b
    }

    /// A peer's words for a blob of `len` pieces: `None` unless there are exactly enough words and no bit past
    /// `len` is set.
    pub fn from_words(len: u64, words: Vec<u64>) -> Option<Self> {
        if words.len() as u64 != len.div_ceil(64) {
            return None;
        }
        let mut b = Self { words, len, ones: 0 };
        let before = b.words.clone();
        b.clear_tail();
        if b.words != before {
            return None;
        }
        b.ones = b.words.iter().map(|w| u64::from(w.count_ones())).sum();
        Some(b)
    }

    fn clear_tail(&mut self) {
        let rem = self.len % 64;
        if rem != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << rem) - 1;
        }
    }

    /// The words (the wire form).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Pieces the set is over.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set is over no pieces at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pieces in the set.
    pub fn count(&self) -> u64 {
        self.ones
    }

    /// Every piece is in the set.
    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    /// Whether piece `i` is in the set (`false` past the end).
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Adds piece `i`; returns whether it was new (`false` past the end).
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let bit = 1 << (i % 64);
        let new = *w & bit == 0;
        *w |= bit;
        self.ones += u64::from(new);
        new
    }

    /// Removes piece `i`; returns whether it was there.
    pub fn unset(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let bit = 1 << (i % 64);
        let was = *w & bit != 0;
        *w &= !bit;
        self.ones -= u64::from(was);
        was
    }

    /// The number of pieces from 0 on that are all in the set.
    pub fn leading(&self) -> u64 {
        let mut n = 0;
        for w in &self.words {
            if *w == u64::MAX {
                n += 64;
            } else {
                n += u64::from(w.trailing_ones());
                break;
            }
        }
        n.min(self.len)
    }

    /// The pieces in the set, in order.
    pub fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| BitsOf(w).map(move |b| i as u64 * 64 + b))
    }
}

/// The set bits of one word, lowest first.
pub(crate) struct BitsOf(pub(crate) u64);

impl Iterator for BitsOf {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(u64::from(b))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn peers_words_are_checked() {
        assert!(Bitfield::from_words(70, vec![0, 0]).is_some());
        assert!(Bitfield::from_words(70, vec![0]).is_none(), "too few words");
        assert!(Bitfield::from_words(70, vec![0, 0, 0]).is_none(), "too many words");
        assert!(Bitfield::from_words(70, vec![0, 1 << 6]).is_none(), "a bit past the end");
        let b = Bitfield::from_words(70, vec![u64::MAX, 0b11_1111]).expect("valid");
        assert!(b.is_full());
        assert_eq!(Bitfield::full(70), b);
        assert_eq!(Bitfield::new(0).leading(), 0);
        assert!(Bitfield::full(0).is_full());
    }

    proptest! {
        #[test]
        fn behaves_as_a_set(len in 0u64..300, ops in prop::collection::vec((any::<bool>(), 0u64..320), 0..200)) {
            let mut b = Bitfield::new(len);
            let mut model = std::collections::BTreeSet::new();
            for (add, i) in ops {
                if add {
                    prop_assert_eq!(b.set(i), i < len && model.insert(i));
                } else {
                    prop_assert_eq!(b.unset(i), model.remove(&i));
                }
            }
            prop_assert_eq!(b.count(), model.len() as u64);
            prop_assert_eq!(b.ones().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            let leading = (0..).take_while(|i| model.contains(i)).count() as u64;
            prop_assert_eq!(b.leading(), leading);
            prop_assert_eq!(Bitfield::from_words(len, b.words().to_vec()), Some(b.clone()));
            prop_assert_eq!(b.is_full(), model.len() as u64 == len);
        }
    }
}
