//! Member selection: a sans-io core. It knows weights and live-tunnel counts, never sockets or
//! clocks, so seeded simulations can test it.

use std::sync::{Arc, Mutex};

use crate::config::LbMethod;

#[derive(Debug, Clone)]
struct MemberSlot {
    weight: u32,
    /// Apache's lbstatus: grows by lbfactor each pick, the winner pays the total.
    lbstatus: i64,
    /// Tunnels (and handshakes in progress) currently held by this member.
    live: u64,
}

/// Selection state for one cluster.
#[derive(Debug, Clone)]
pub struct Balancer {
    method: LbMethod,
    members: Vec<MemberSlot>,
    /// Rotates the starting point among least-conn ties.
    next_tie: usize,
}

impl Balancer {
    pub fn new(method: LbMethod, weights: &[u32]) -> Self {
        Balancer {
            method,
            members: weights
                .iter()
                .map(|&weight| MemberSlot {
                    weight: weight.max(1),
                    lbstatus: 0,
                    live: 0,
                })
                .collect(),
            next_tie: 0,
        }
    }

    /// Picks a member among those `usable` returns true for, and counts it live.
    pub fn pick(&mut self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let chosen = match self.method {
            LbMethod::ByRequests => self.pick_by_requests(&usable),
            LbMethod::LeastConn => self.pick_least_conn(&usable),
        }?;
        self.members[chosen].live += 1;
        Some(chosen)
    }

    /// A pick ended (tunnel closed or handshake failed).
    pub fn release(&mut self, member: usize) {
        if let Some(slot) = self.members.get_mut(member) {
            slot.live = slot.live.saturating_sub(1);
        }
    }

    pub fn live(&self, member: usize) -> u64 {
        self.members.get(member).map_or(0, |slot| slot.live)
    }

    /// Apache mod_lbmethod_byrequests: every usable member gains its lbfactor, the one with the
    /// highest lbstatus wins and pays back the sum, which spreads picks smoothly by weight.
    fn pick_by_requests(&mut self, usable: &impl Fn(usize) -> bool) -> Option<usize> {
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for index in 0..self.members.len() {
            if !usable(index) {
                continue;
            }
            let slot = &mut self.members[index];
            slot.lbstatus += i64::from(slot.weight);
            total += i64::from(slot.weight);
            let status = slot.lbstatus;
            if best.is_none_or(|b| status > self.members[b].lbstatus) {
                best = Some(index);
            }
        }
        let chosen = best?;
        self.members[chosen].lbstatus -= total;
        Some(chosen)
    }

    /// Fewest live tunnels per unit of weight; ties rotate so equal members share evenly.
    fn pick_least_conn(&mut self, usable: &impl Fn(usize) -> bool) -> Option<usize> {
        let count = self.members.len();
        let mut best: Option<usize> = None;
        for step in 0..count {
            let index = (self.next_tie + step) % count;
            if !usable(index) {
                continue;
            }
            // live/weight compared without division: a.live * b.weight < b.live * a.weight.
            let better = best.is_none_or(|b| {
                let (candidate, current) = (&self.members[index], &self.members[b]);
                u128::from(candidate.live) * u128::from(current.weight)
                    < u128::from(current.live) * u128::from(candidate.weight)
            });
            if better {
                best = Some(index);
            }
        }
        let chosen = best?;
        self.next_tie = (chosen + 1) % count;
        Some(chosen)
    }
}

/// A balancer shared by the workers of one cluster.
pub type SharedBalancer = Arc<Mutex<Balancer>>;

/// A member's claim on one live tunnel; dropping it returns the count to the balancer, so a
/// tunnel that ends by any path (close, reset, failed handshake) is counted out exactly once.
#[derive(Debug)]
pub struct Lease {
    balancer: SharedBalancer,
    member: usize,
}

impl Lease {
    /// Picks a member under the cluster's lock.
    pub fn pick(balancer: &SharedBalancer, usable: impl Fn(usize) -> bool) -> Option<Lease> {
        let member = lock(balancer).pick(usable)?;
        Some(Lease {
            balancer: Arc::clone(balancer),
            member,
        })
    }

    pub fn member(&self) -> usize {
        self.member
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        lock(&self.balancer).release(self.member);
    }
}

/// The balancer state stays consistent across a panicking holder (it has no invariants a
/// half-done pick can break), so a poisoned lock is used as it is.
pub fn lock(balancer: &SharedBalancer) -> std::sync::MutexGuard<'_, Balancer> {
    balancer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(balancer: &mut Balancer, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; balancer.members.len()];
        for _ in 0..picks {
            counts[balancer.pick(|_| true).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn byrequests_follows_weights_exactly() {
        let mut balancer = Balancer::new(LbMethod::ByRequests, &[1, 1, 1]);
        assert_eq!(shares(&mut balancer, 300), vec![100, 100, 100]);
        let mut weighted = Balancer::new(LbMethod::ByRequests, &[1, 2, 5]);
        assert_eq!(shares(&mut weighted, 8000), vec![1000, 2000, 5000]);
    }

    #[test]
    fn byrequests_interleaves_instead_of_bursting() {
        let mut balancer = Balancer::new(LbMethod::ByRequests, &[1, 1, 1]);
        let order: Vec<usize> = (0..6).map(|_| balancer.pick(|_| true).unwrap()).collect();
        assert_eq!(order, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn unusable_members_are_skipped() {
        let mut balancer = Balancer::new(LbMethod::ByRequests, &[1, 1, 1]);
        for _ in 0..10 {
            assert_ne!(balancer.pick(|i| i != 1), Some(1));
        }
        assert_eq!(balancer.pick(|_| false), None);
    }

    #[test]
    fn least_conn_fills_the_emptiest_member() {
        let mut balancer = Balancer::new(LbMethod::LeastConn, &[1, 1, 1]);
        assert_eq!(shares(&mut balancer, 300), vec![100, 100, 100]);
        for _ in 0..100 {
            balancer.release(0);
        }
        assert_eq!(shares(&mut balancer, 100), vec![100, 0, 0]);
    }

    #[test]
    fn least_conn_respects_weight() {
        let mut balancer = Balancer::new(LbMethod::LeastConn, &[1, 3]);
        assert_eq!(shares(&mut balancer, 400), vec![100, 300]);
    }
}
