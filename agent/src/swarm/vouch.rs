//! Which piece hashes a download may believe before its sha256 matched, and who lied once the truth is known.
//!
//! A piece's hash comes from its sender, so a member that lies consistently (wrong bytes, hashes computed over
//! them) passes every piece check. A *piece table* is a member's word that it verified the whole blob against its
//! digest and recorded these hashes while writing it. One member's word is not enough to stream by: two members'
//! tables that agree are (or two that disagree once upstream settled which one lied, on the first piece they
//! disagree about). With only one member's word, a download holds its readers until the sha256 matched; with no
//! table at all (nobody has verified the blob yet: a cold burst, every source still downloading), pieces are
//! streamed on their senders' hashes, as the home's own upstream download is.
//!
//! Blame needs proof: a member that vouched for a table the truth contradicts, or a complete holder that sent a
//! piece the truth contradicts, lied. A partial holder that sent a wrong piece may only have relayed what another
//! member sent it: it is not quarantined (its pieces are refused for this download only).

use std::collections::BTreeSet;

use libp2p::PeerId;

use crate::pieces::PieceTable;

/// What a download's tables say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vouch {
    /// No member vouched: stream on the senders' hashes.
    Nobody,
    /// One member's word only: hold readers until the sha256 matched.
    One(PeerId),
    /// Two members agree: check every piece against the table and stream.
    Agreed(PieceTable),
    /// Two members disagree, first about piece `piece`: upstream's bytes of that piece settle it.
    Disputed {
        /// The first piece they disagree about.
        piece: u64,
    },
}

/// Weighs the tables members gave (at most two are asked; a table of another shape was refused before).
pub fn weigh(tables: &[(PeerId, PieceTable)]) -> Vouch {
    match tables {
        [] => Vouch::Nobody,
        [(p, _)] => Vouch::One(*p),
        [(_, a), (_, b), ..] => match a.hashes.iter().zip(&b.hashes).position(|(x, y)| x != y) {
            None if a == b => Vouch::Agreed(a.clone()),
            // Same hashes, other shapes: cannot happen for tables of one blob's size; trust neither.
            None => Vouch::Disputed { piece: 0 },
            Some(i) => Vouch::Disputed { piece: i as u64 },
        },
    }
}

/// Settles a dispute with upstream's hash of `piece`: the table that has it wins; every table that has not lied.
pub fn settle(tables: &[(PeerId, PieceTable)], piece: u64, truth: [u8; 32]) -> (Option<PieceTable>, Vec<PeerId>) {
    let says = |t: &PieceTable| t.hashes.get(piece as usize) == Some(&truth);
    let winner = tables.iter().find(|(_, t)| says(t)).map(|(_, t)| t.clone());
    let liars = tables.iter().filter(|(_, t)| !says(t)).map(|(p, _)| *p).collect();
    (winner, liars)
}

/// Who sent a piece a download wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sender {
    /// The member.
    pub peer: PeerId,
    /// It said it held the whole blob, verified.
    pub complete: bool,
}

/// Who is to blame once the true table is known.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Blame {
    /// Proven liars: a table they vouched for, or a piece they sent as complete holders, contradicts the truth.
    pub liars: BTreeSet<PeerId>,
    /// Partial holders that passed on a wrong piece (perhaps relaying a liar's): not proof of anything.
    pub relayed: BTreeSet<PeerId>,
}

/// Compares what a download wrote (`written[i]`, sent by `senders[i]`, `None` for upstream's bytes) and the tables
/// members vouched for with the `truth` (the table of the bytes that matched the digest).
pub fn blame(
    senders: &[Option<Sender>],
    written: &[[u8; 32]],
    vouchers: &[(PeerId, PieceTable)],
    truth: &PieceTable,
) -> Blame {
    let mut b = Blame::default();
    for (i, (sender, hash)) in senders.iter().zip(written).enumerate() {
        let Some(s) = sender else { continue };
        if truth.hashes.get(i) == Some(hash) {
            continue;
        }
        if s.complete {
            b.liars.insert(s.peer);
        } else {
            b.relayed.insert(s.peer);
        }
    }
    for (p, t) in vouchers {
        if t != truth {
            b.liars.insert(*p);
        }
    }
    b.relayed.retain(|p| !b.liars.contains(p));
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(hashes: &[u8]) -> PieceTable {
        PieceTable {
            piece: 1 << 20,
            size: hashes.len() as u64 * (1 << 20),
            hashes: hashes.iter().map(|h| [*h; 32]).collect(),
        }
    }

    #[test]
    fn two_members_must_agree_to_be_believed() {
        let (a, b) = (PeerId::random(), PeerId::random());
        assert_eq!(weigh(&[]), Vouch::Nobody);
        assert_eq!(weigh(&[(a, table(&[1, 2, 3]))]), Vouch::One(a));
        assert_eq!(weigh(&[(a, table(&[1, 2, 3])), (b, table(&[1, 2, 3]))]), Vouch::Agreed(table(&[1, 2, 3])));
        assert_eq!(weigh(&[(a, table(&[1, 2, 3])), (b, table(&[1, 9, 9]))]), Vouch::Disputed { piece: 1 });
    }

    #[test]
    fn upstream_settles_a_dispute_and_names_the_liar() {
        let (honest, liar) = (PeerId::random(), PeerId::random());
        let tables = [(liar, table(&[1, 9, 3])), (honest, table(&[1, 2, 3]))];
        let (winner, liars) = settle(&tables, 1, [2; 32]);
        assert_eq!(winner, Some(table(&[1, 2, 3])));
        assert_eq!(liars, vec![liar]);
        // Upstream agrees with neither: both lied, nobody is believed.
        let (winner, liars) = settle(&tables, 1, [7; 32]);
        assert_eq!(winner, None);
        assert_eq!(liars.len(), 2);
    }

    #[test]
    fn only_proven_liars_are_blamed() {
        let (liar, relay, honest, voucher) = (PeerId::random(), PeerId::random(), PeerId::random(), PeerId::random());
        let truth = table(&[1, 2, 3, 4, 5]);
        let sent = |peer, complete| Some(Sender { peer, complete });
        // Piece 1 from the liar (complete), piece 3 relayed wrong by a partial holder, the rest right or from
        // upstream; the liar also vouched for its false table, the other voucher for the true one.
        let senders = [sent(honest, true), sent(liar, true), None, sent(relay, false), sent(honest, false)];
        let written = [[1; 32], [9; 32], [3; 32], [9; 32], [5; 32]];
        let vouchers = [(liar, table(&[1, 9, 3, 9, 5])), (voucher, truth.clone())];
        let b = blame(&senders, &written, &vouchers, &truth);
        assert_eq!(b.liars, BTreeSet::from([liar]));
        assert_eq!(b.relayed, BTreeSet::from([relay]));
        // A voucher whose table is false is a liar even if it sent nothing.
        let b = blame(&[None; 5], &truth.hashes, &[(voucher, table(&[1, 2, 3, 4, 6]))], &truth);
        assert_eq!(b.liars, BTreeSet::from([voucher]));
    }
}
