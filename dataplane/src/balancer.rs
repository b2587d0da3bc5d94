//! Member selection: a sans-io core. It knows weights, states, routes and live-tunnel counts,
//! never sockets or clocks (the time comes in as milliseconds), so seeded simulations can
//! test it.
//!
//! A pick first honours a sticky route whose member is usable (a draining member still takes
//! its sticky sessions, as in Apache), then chooses by the cluster's method among the usable
//! active members, and only when none is left among the usable hot standbys.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::{LbMethod, MemberStatus};

/// One member as the balancer sees it.
#[derive(Debug, Clone)]
pub struct MemberSpec {
    /// Stable across restarts and across a fleet (a hash of the member's url): what
    /// consistent hashing ranks, so every node picks the same member for the same key.
    pub key: u64,
    pub weight: u32,
    pub status: MemberStatus,
    /// The name a sticky cookie or URL parameter carries (Apache `route=`).
    pub route: Option<String>,
    /// Tunnels (and handshakes) at most at once; beyond, the member is full.
    pub max_conns: Option<u64>,
}

#[derive(Debug, Clone)]
struct MemberSlot {
    spec: MemberSpec,
    /// Apache's lbstatus: grows by lbfactor each pick, the winner pays the total.
    lbstatus: i64,
    /// Tunnels (and handshakes in progress) currently held by this member.
    live: u64,
    /// Bytes moved through this member's tunnels (bytraffic).
    transferred: u64,
    /// A failed connect or upgrade keeps it out until then (Apache `retry=`).
    error_until_ms: u64,
    /// Marked down by active health checks.
    down: bool,
}

/// What a pick knows of the request.
#[derive(Debug, Clone, Copy, Default)]
pub struct PickRequest<'a> {
    pub now_ms: u64,
    /// The hashed key (client address, a header or a cookie) for `hash`.
    pub hash: Option<u64>,
    /// The route a sticky cookie or URL parameter names.
    pub route: Option<&'a str>,
}

/// A chosen member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Picked {
    pub member: usize,
    /// The request's sticky route led here.
    pub sticky: bool,
}

/// Why no member was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoMember {
    /// Every member is disabled, draining, in error, down, or already tried.
    NoneUsable,
    /// The members that could take it are at their connection limit.
    AllFull,
}

/// Selection state for one cluster.
#[derive(Debug, Clone)]
pub struct Balancer {
    method: LbMethod,
    members: Vec<MemberSlot>,
    /// How long a member that failed stays out (Apache `retry=`).
    retry_ms: u64,
    /// Rotates the starting point among least-conn ties.
    next_tie: usize,
    /// Per member, bumped when its tunnels are to be closed (a member marked down with
    /// `shutdown_sessions`); a lease taken before the bump is evicted. Read by the carriers
    /// without the lock.
    evictions: Arc<[AtomicU64]>,
    /// Whether carriers need to watch for evictions at all.
    pub shutdown_sessions: bool,
}

impl Balancer {
    pub fn new(method: LbMethod, members: Vec<MemberSpec>, retry_ms: u64) -> Self {
        Balancer {
            evictions: members.iter().map(|_| AtomicU64::new(0)).collect(),
            shutdown_sessions: false,
            method,
            members: members
                .into_iter()
                .map(|mut spec| {
                    spec.weight = spec.weight.max(1);
                    MemberSlot {
                        spec,
                        lbstatus: 0,
                        live: 0,
                        transferred: 0,
                        error_until_ms: 0,
                        down: false,
                    }
                })
                .collect(),
            retry_ms,
            next_tie: 0,
        }
    }

    /// Picks a member the request may go to, not one `tried` says was tried, and counts it
    /// live.
    pub fn pick(
        &mut self,
        request: &PickRequest<'_>,
        tried: impl Fn(usize) -> bool,
    ) -> Result<Picked, NoMember> {
        let mut full = false;
        let mut usable = vec![false; self.members.len()];
        for (index, slot) in self.members.iter().enumerate() {
            let healthy = slot.spec.status != MemberStatus::Disabled
                && !slot.down
                && request.now_ms >= slot.error_until_ms
                && !tried(index);
            let has_room = slot.spec.max_conns.is_none_or(|max| slot.live < max);
            full |= healthy && !has_room;
            usable[index] = healthy && has_room;
        }
        let sticky = request.route.and_then(|route| {
            self.members
                .iter()
                .position(|slot| slot.spec.route.as_deref() == Some(route))
                .filter(|&index| usable[index])
        });
        let chosen = match sticky {
            Some(index) => Some(index),
            None => {
                let of_status = |status: MemberStatus| {
                    let members: Vec<bool> = (0..usable.len())
                        .map(|i| usable[i] && self.members[i].spec.status == status)
                        .collect();
                    members.contains(&true).then_some(members)
                };
                match of_status(MemberStatus::Active).or_else(|| of_status(MemberStatus::Standby)) {
                    Some(candidates) => self.choose(&candidates, request.hash),
                    None => None,
                }
            }
        };
        let Some(member) = chosen else {
            return Err(if full {
                NoMember::AllFull
            } else {
                NoMember::NoneUsable
            });
        };
        self.members[member].live += 1;
        Ok(Picked {
            member,
            sticky: sticky.is_some(),
        })
    }

    fn choose(&mut self, candidates: &[bool], hash: Option<u64>) -> Option<usize> {
        match (self.method, hash) {
            (LbMethod::ByRequests, _) => self.pick_by_requests(candidates),
            (LbMethod::ByTraffic, _) => self.pick_by_traffic(candidates),
            (LbMethod::LeastConn, _) => self.pick_least_conn(candidates),
            (LbMethod::Hash, Some(hash)) => self.pick_by_hash(candidates, hash),
            // No key in this request (a missing header or cookie): spread by requests.
            (LbMethod::Hash, None) => self.pick_by_requests(candidates),
        }
    }

    /// A pick ended (tunnel closed or handshake failed).
    pub fn release(&mut self, member: usize) {
        if let Some(slot) = self.members.get_mut(member) {
            slot.live = slot.live.saturating_sub(1);
        }
    }

    /// Passive health: a failed connect or upgrade keeps the member out for `retry`.
    pub fn failed(&mut self, member: usize, now_ms: u64) {
        if let Some(slot) = self.members.get_mut(member) {
            slot.error_until_ms = now_ms.saturating_add(self.retry_ms);
        }
    }

    /// Every tunnel now open on `member` is to be closed (its carriers find out within about
    /// a second).
    pub fn evict(&mut self, member: usize) {
        if let Some(epoch) = self.evictions.get(member) {
            epoch.fetch_add(1, Ordering::Release);
        }
    }

    /// Active health: a member marked down is not picked until marked up.
    pub fn set_down(&mut self, member: usize, down: bool) {
        if let Some(slot) = self.members.get_mut(member) {
            slot.down = down;
        }
    }

    pub fn set_status(&mut self, member: usize, status: MemberStatus) {
        if let Some(slot) = self.members.get_mut(member) {
            slot.spec.status = status;
        }
    }

    /// Bytes a tunnel of this member moved (bytraffic weighs by them).
    pub fn record_traffic(&mut self, member: usize, bytes: u64) {
        if let Some(slot) = self.members.get_mut(member) {
            slot.transferred = slot.transferred.saturating_add(bytes);
        }
    }

    /// Whether active health checks have the member down.
    pub fn is_down(&self, member: usize) -> bool {
        self.members.get(member).is_some_and(|slot| slot.down)
    }

    pub fn live(&self, member: usize) -> u64 {
        self.members.get(member).map_or(0, |slot| slot.live)
    }

    /// The route of a member, for the cookie that makes a client sticky to it.
    pub fn route(&self, member: usize) -> Option<&str> {
        self.members.get(member)?.spec.route.as_deref()
    }

    /// Apache mod_lbmethod_byrequests: every candidate gains its lbfactor, the one with the
    /// highest lbstatus wins and pays back the sum, which spreads picks smoothly by weight.
    fn pick_by_requests(&mut self, candidates: &[bool]) -> Option<usize> {
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (index, &candidate) in candidates.iter().enumerate() {
            if !candidate {
                continue;
            }
            let slot = &mut self.members[index];
            slot.lbstatus += i64::from(slot.spec.weight);
            total += i64::from(slot.spec.weight);
            let status = slot.lbstatus;
            if best.is_none_or(|b| status > self.members[b].lbstatus) {
                best = Some(index);
            }
        }
        let chosen = best?;
        self.members[chosen].lbstatus -= total;
        Some(chosen)
    }

    /// Apache mod_lbmethod_bytraffic: the fewest bytes moved per unit of weight.
    fn pick_by_traffic(&mut self, candidates: &[bool]) -> Option<usize> {
        self.fewest_per_weight(candidates, |slot| slot.transferred)
    }

    /// Fewest live tunnels per unit of weight; ties rotate so equal members share evenly.
    fn pick_least_conn(&mut self, candidates: &[bool]) -> Option<usize> {
        self.fewest_per_weight(candidates, |slot| slot.live)
    }

    fn fewest_per_weight(
        &mut self,
        candidates: &[bool],
        load: impl Fn(&MemberSlot) -> u64,
    ) -> Option<usize> {
        let count = self.members.len();
        let mut best: Option<usize> = None;
        for step in 0..count {
            let index = (self.next_tie + step) % count;
            if !candidates[index] {
                continue;
            }
            // load/weight compared without division: a.load * b.weight < b.load * a.weight.
            let better = best.is_none_or(|b| {
                let (candidate, current) = (&self.members[index], &self.members[b]);
                u128::from(load(candidate)) * u128::from(current.spec.weight)
                    < u128::from(load(current)) * u128::from(candidate.spec.weight)
            });
            if better {
                best = Some(index);
            }
        }
        let chosen = best?;
        self.next_tie = (chosen + 1) % count;
        Some(chosen)
    }

    /// Weighted rendezvous hashing: each candidate scores weight / -ln(u), u uniform in (0, 1)
    /// from the key and the member's own key; the highest wins. Removing a member moves only
    /// the keys it held, adding one takes about weight/total of the keys, and the order does
    /// not depend on member positions, so a fleet with the same members agrees.
    fn pick_by_hash(&mut self, candidates: &[bool], hash: u64) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (index, slot) in self.members.iter().enumerate() {
            if !candidates[index] {
                continue;
            }
            let mixed = splitmix64(hash ^ splitmix64(slot.spec.key));
            // 53 random bits, shifted off zero: u in (0, 1).
            let unit = ((mixed >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = f64::from(slot.spec.weight) / -unit.ln();
            if best.is_none_or(|(_, top)| score > top) {
                best = Some((index, score));
            }
        }
        best.map(|(index, _)| index)
    }
}

/// A stable 64-bit mix (splitmix64's finalizer); also how request keys are hashed.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A stable hash of bytes (FNV-1a, then mixed): the same on every node and every run.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &byte in bytes {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    splitmix64(hash)
}

/// A balancer shared by the workers of one cluster.
pub type SharedBalancer = Arc<Mutex<Balancer>>;

/// A member's claim on one live tunnel; dropping it returns the count to the balancer, so a
/// tunnel that ends by any path (close, reset, failed handshake) is counted out exactly once.
#[derive(Debug)]
pub struct Lease {
    balancer: SharedBalancer,
    member: usize,
    /// The member's eviction count when this lease was taken; None: nobody evicts here.
    epoch: Option<(Arc<[AtomicU64]>, u64)>,
}

impl Lease {
    /// Picks a member under the cluster's lock.
    pub fn pick(
        balancer: &SharedBalancer,
        request: &PickRequest<'_>,
        tried: impl Fn(usize) -> bool,
    ) -> Result<(Lease, Picked), NoMember> {
        let mut locked = lock(balancer);
        let picked = locked.pick(request, tried)?;
        let epoch = locked.shutdown_sessions.then(|| {
            let evictions = Arc::clone(&locked.evictions);
            let now = evictions[picked.member].load(Ordering::Acquire);
            (evictions, now)
        });
        drop(locked);
        Ok((
            Lease {
                balancer: Arc::clone(balancer),
                member: picked.member,
                epoch,
            },
            picked,
        ))
    }

    pub fn member(&self) -> usize {
        self.member
    }

    /// Whether the carrier should watch this tunnel for eviction.
    pub fn evictable(&self) -> bool {
        self.epoch.is_some()
    }

    /// The member was marked down with `shutdown_sessions` since this tunnel began.
    pub fn evicted(&self) -> bool {
        self.epoch.as_ref().is_some_and(|(evictions, epoch)| {
            evictions[self.member].load(Ordering::Acquire) != *epoch
        })
    }

    /// Bytes the tunnel moved, both ways (bytraffic weighs members by them).
    pub fn record_traffic(&self, bytes: u64) {
        lock(&self.balancer).record_traffic(self.member, bytes);
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

    const ANY: PickRequest<'static> = PickRequest {
        now_ms: 0,
        hash: None,
        route: None,
    };

    fn pick(balancer: &mut Balancer, request: &PickRequest<'_>) -> Option<usize> {
        balancer.pick(request, |_| false).ok().map(|p| p.member)
    }

    fn shares(balancer: &mut Balancer, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; balancer.members.len()];
        for _ in 0..picks {
            counts[pick(balancer, &ANY).unwrap()] += 1;
        }
        counts
    }

    fn spec(key: u64, weight: u32, status: MemberStatus, route: &str) -> MemberSpec {
        MemberSpec {
            key,
            weight,
            status,
            route: (!route.is_empty()).then(|| route.to_string()),
            max_conns: None,
        }
    }

    /// Active members with `weights`.
    fn with_weights(method: LbMethod, weights: &[u32]) -> Balancer {
        let members = weights
            .iter()
            .enumerate()
            .map(|(index, &weight)| spec(index as u64, weight, MemberStatus::Active, ""))
            .collect();
        Balancer::new(method, members, 0)
    }

    /// Each member's share of `counts` is within two points of its share of the weights.
    fn assert_shares_follow(counts: &[usize], weights: &[u32]) {
        let picks: usize = counts.iter().sum();
        let total: u32 = weights.iter().sum();
        for (count, weight) in counts.iter().zip(weights) {
            let share = *count as f64 / picks as f64;
            let expected = f64::from(*weight) / f64::from(total);
            assert!(
                (share - expected).abs() <= 0.02,
                "shares {counts:?} for weights {weights:?}"
            );
        }
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = splitmix64(self.0);
            self.0
        }
    }

    #[test]
    fn byrequests_follows_weights_exactly() {
        let mut balancer = with_weights(LbMethod::ByRequests, &[1, 1, 1]);
        assert_eq!(shares(&mut balancer, 300), vec![100, 100, 100]);
        let mut weighted = with_weights(LbMethod::ByRequests, &[1, 2, 5]);
        assert_eq!(shares(&mut weighted, 8000), vec![1000, 2000, 5000]);
    }

    #[test]
    fn byrequests_interleaves_instead_of_bursting() {
        let mut balancer = with_weights(LbMethod::ByRequests, &[1, 1, 1]);
        let order: Vec<usize> = (0..6).map(|_| pick(&mut balancer, &ANY).unwrap()).collect();
        assert_eq!(order, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn tried_members_are_skipped() {
        let mut balancer = with_weights(LbMethod::ByRequests, &[1, 1, 1]);
        for _ in 0..10 {
            assert_ne!(balancer.pick(&ANY, |i| i == 1).unwrap().member, 1);
        }
        assert_eq!(balancer.pick(&ANY, |_| true), Err(NoMember::NoneUsable));
    }

    #[test]
    fn least_conn_fills_the_emptiest_member() {
        let mut balancer = with_weights(LbMethod::LeastConn, &[1, 1, 1]);
        assert_eq!(shares(&mut balancer, 300), vec![100, 100, 100]);
        for _ in 0..100 {
            balancer.release(0);
        }
        assert_eq!(shares(&mut balancer, 100), vec![100, 0, 0]);
    }

    /// 100,000 picks per method with tunnels ending at random and random sizes: every share
    /// within two points of its weight's.
    #[test]
    fn every_method_follows_weights_over_a_hundred_thousand_picks() {
        let weights = [1, 2, 3, 4];
        for method in [
            LbMethod::ByRequests,
            LbMethod::LeastConn,
            LbMethod::ByTraffic,
            LbMethod::Hash,
        ] {
            let mut rng = Rng(0x5eed ^ method as u64);
            let mut balancer = with_weights(method, &weights);
            let mut open: Vec<usize> = Vec::new();
            let mut counts = vec![0; weights.len()];
            for _ in 0..100_000 {
                let request = PickRequest {
                    hash: Some(rng.next()),
                    ..ANY
                };
                let member = pick(&mut balancer, &request).unwrap();
                counts[member] += 1;
                // Each tunnel moves 1..64 KiB; a random earlier one ends.
                balancer.record_traffic(member, 1 + rng.next() % 65_536);
                open.push(member);
                if open.len() > 200 {
                    let ended = open.swap_remove((rng.next() % open.len() as u64) as usize);
                    balancer.release(ended);
                }
            }
            match method {
                // Least-conn balances what is open, not what was picked.
                LbMethod::LeastConn => {
                    let mut live = vec![0; weights.len()];
                    for &member in &open {
                        live[member] += 1;
                    }
                    assert_shares_follow(&live, &weights);
                }
                _ => assert_shares_follow(&counts, &weights),
            }
        }
    }

    #[test]
    fn standby_serves_only_while_every_active_member_is_out() {
        let members = vec![
            spec(1, 1, MemberStatus::Active, ""),
            spec(2, 1, MemberStatus::Active, ""),
            spec(3, 1, MemberStatus::Standby, ""),
        ];
        let mut balancer = Balancer::new(LbMethod::ByRequests, members, 30_000);
        let mut rng = Rng(7);
        for now_ms in 0..1_000 {
            let request = PickRequest { now_ms, ..ANY };
            assert_ne!(pick(&mut balancer, &request), Some(2));
            if rng.next().is_multiple_of(2) {
                balancer.release(0);
            }
        }
        balancer.failed(0, 1_000);
        let request = PickRequest {
            now_ms: 1_001,
            ..ANY
        };
        assert_eq!(pick(&mut balancer, &request), Some(1), "one active is left");
        balancer.set_down(1, true);
        for _ in 0..100 {
            assert_eq!(
                pick(&mut balancer, &request),
                Some(2),
                "every active is out"
            );
        }
        // The failed member's retry has passed: actives again, the standby not.
        let later = PickRequest {
            now_ms: 31_000,
            ..ANY
        };
        for _ in 0..100 {
            assert_eq!(pick(&mut balancer, &later), Some(0));
        }
        balancer.set_down(1, false);
        assert!(pick(&mut balancer, &later).is_some_and(|m| m < 2));
        // Nothing usable at all: disabled standby, actives out.
        balancer.set_status(2, MemberStatus::Disabled);
        balancer.failed(0, 40_000);
        balancer.failed(1, 40_000);
        let request = PickRequest {
            now_ms: 40_001,
            ..ANY
        };
        assert_eq!(
            balancer.pick(&request, |_| false),
            Err(NoMember::NoneUsable)
        );
    }

    #[test]
    fn sticky_routes_are_honoured_while_their_member_is_usable() {
        let members = vec![
            spec(1, 5, MemberStatus::Active, "server1"),
            spec(2, 1, MemberStatus::Active, "server2"),
            spec(3, 1, MemberStatus::Drain, "server3"),
        ];
        let mut balancer = Balancer::new(LbMethod::ByRequests, members, 10_000);
        let to = |route| PickRequest {
            route: Some(route),
            ..ANY
        };
        for _ in 0..1_000 {
            let picked = balancer.pick(&to("server2"), |_| false).unwrap();
            assert_eq!((picked.member, picked.sticky), (1, true));
        }
        // A draining member keeps its sticky clients but gets no new ones.
        assert_eq!(pick(&mut balancer, &to("server3")), Some(2));
        for _ in 0..100 {
            assert_ne!(pick(&mut balancer, &ANY), Some(2));
        }
        // Its member out: another is picked, and the pick says the route was not honoured.
        balancer.failed(1, 0);
        let picked = balancer.pick(&to("server2"), |_| false).unwrap();
        assert!(!picked.sticky && picked.member != 1);
        // An unknown route is no route.
        assert!(!balancer.pick(&to("nope"), |_| false).unwrap().sticky);
    }

    #[test]
    fn a_full_member_is_skipped_and_all_full_is_said() {
        let mut members = vec![
            spec(1, 1, MemberStatus::Active, ""),
            spec(2, 1, MemberStatus::Active, ""),
        ];
        members[0].max_conns = Some(2);
        members[1].max_conns = Some(1);
        let mut balancer = Balancer::new(LbMethod::LeastConn, members, 0);
        let picks: Vec<_> = (0..3).map(|_| pick(&mut balancer, &ANY)).collect();
        assert_eq!(picks.iter().filter(|p| **p == Some(0)).count(), 2);
        assert_eq!(balancer.pick(&ANY, |_| false), Err(NoMember::AllFull));
        balancer.release(1);
        assert_eq!(pick(&mut balancer, &ANY), Some(1));
    }

    /// Rendezvous hashing over 100,000 keys: removing one of five members moves only its
    /// keys (about 1/5), adding a sixth moves about 1/6, and a node listing the members in
    /// another order picks the same member (by its key) for every key.
    #[test]
    fn consistent_hashing_moves_about_one_nth_and_agrees_across_nodes() {
        let five: Vec<MemberSpec> = (0..5)
            .map(|i| {
                spec(
                    stable_hash(format!("ws://10.0.0.{i}:80").as_bytes()),
                    1,
                    MemberStatus::Active,
                    "",
                )
            })
            .collect();
        let mut six = five.clone();
        six.push(spec(
            stable_hash(b"ws://10.0.0.5:80"),
            1,
            MemberStatus::Active,
            "",
        ));
        let mut reversed = five.clone();
        reversed.reverse();
        let mut nodes = [
            Balancer::new(LbMethod::Hash, five.clone(), 0),
            Balancer::new(LbMethod::Hash, six.clone(), 0),
            Balancer::new(LbMethod::Hash, reversed.clone(), 0),
        ];
        let key_of = |balancer: &mut Balancer,
                      specs: &[MemberSpec],
                      hash: u64,
                      tried: &dyn Fn(usize) -> bool| {
            let request = PickRequest {
                hash: Some(hash),
                ..ANY
            };
            let member = balancer.pick(&request, tried).unwrap().member;
            balancer.release(member);
            specs[member].key
        };
        let (mut moved_by_removal, mut moved_by_addition) = (0, 0);
        let keys = 100_000;
        let mut rng = Rng(0xc0ffee);
        for _ in 0..keys {
            let hash = rng.next();
            let before = key_of(&mut nodes[0], &five, hash, &|_| false);
            let other_node = key_of(&mut nodes[2], &reversed, hash, &|_| false);
            assert_eq!(before, other_node, "nodes disagree");
            // Member 2 removed (tried: as if down).
            let without = key_of(&mut nodes[0], &five, hash, &|i| i == 2);
            if without != before {
                assert_eq!(
                    before, five[2].key,
                    "a key moved that the removed member did not hold"
                );
                moved_by_removal += 1;
            }
            if key_of(&mut nodes[1], &six, hash, &|_| false) != before {
                moved_by_addition += 1;
            }
        }
        let removal = f64::from(moved_by_removal) / f64::from(keys);
        let addition = f64::from(moved_by_addition) / f64::from(keys);
        assert!((removal - 0.2).abs() < 0.01, "removal moved {removal}");
        assert!(
            (addition - 1.0 / 6.0).abs() < 0.01,
            "addition moved {addition}"
        );
    }
}
