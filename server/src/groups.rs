//! The group coordinator for Kafka's classic consumer-group protocol: membership, generations and
//! rebalances (JoinGroup / SyncGroup / Heartbeat / LeaveGroup), static membership, session and
//! rebalance timeouts. Assignment is the clients' business (the leader runs range, roundrobin or
//! cooperative-sticky and sends the result in SyncGroup); the coordinator passes bytes through.
//!
//! State lives in memory behind one lock; nothing is awaited while it is held. Members waiting for
//! a rebalance to complete hold a oneshot receiver; a ticker thread expires sessions and ends
//! rebalances whose timeout passed. Group membership is not persisted: after a restart members
//! rejoin (their committed offsets are durable, in `offsets.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::oneshot;
use kafka_protocol::ResponseError;

/// Coordinator settings, Kafka's names.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// `group.min.session.timeout.ms`
    pub min_session_timeout: Duration,
    /// `group.max.session.timeout.ms`
    pub max_session_timeout: Duration,
    /// `group.initial.rebalance.delay.ms`: how long the first rebalance of an empty group waits for
    /// more members before completing.
    pub initial_rebalance_delay: Duration,
    /// `group.max.size`
    pub max_size: usize,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            min_session_timeout: Duration::from_millis(6_000),
            max_session_timeout: Duration::from_millis(1_800_000),
            initial_rebalance_delay: Duration::from_millis(3_000),
            max_size: usize::MAX,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    /// The names Kafka reports in ListGroups and DescribeGroups.
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

/// What a JoinGroup answers.
#[derive(Clone, Debug, Default)]
pub struct JoinOutcome {
    pub error: i16,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// Only for the leader: every member's id, instance id and subscription metadata.
    pub members: Vec<(String, Option<String>, Bytes)>,
}

impl JoinOutcome {
    fn error(e: ResponseError, member_id: &str) -> JoinOutcome {
        JoinOutcome {
            error: e.code(),
            generation: -1,
            member_id: member_id.to_string(),
            ..Default::default()
        }
    }
}

/// What a SyncGroup answers: an error code, or the member's assignment.
pub type SyncOutcome = Result<(Bytes, Option<String>, Option<String>), ResponseError>;

#[derive(Debug)]
struct Member {
    id: String,
    instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocol_type: String,
    protocols: Vec<(String, Bytes)>,
    assignment: Bytes,
    joining: Option<oneshot::Sender<JoinOutcome>>,
    syncing: Option<oneshot::Sender<SyncOutcome>>,
    last_seen: Instant,
}

impl Member {
    /// This member's subscription metadata for `protocol` (empty if it does not speak it).
    fn metadata_for(&self, protocol: Option<&String>) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| Some(n) == protocol)
            .map(|(_, md)| md.clone())
            .unwrap_or_default()
    }
}

#[derive(Debug)]
struct Group {
    state: GroupState,
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// Static membership: group.instance.id → member id.
    instances: HashMap<String, String>,
    /// Ids handed out with MEMBER_ID_REQUIRED (KIP-394), until they rejoin or their session
    /// timeout passes.
    pending: HashMap<String, Instant>,
    /// When the current rebalance gives up on members that have not rejoined.
    rebalance_deadline: Option<Instant>,
    /// The first rebalance of an empty group completes no earlier than this.
    not_before: Option<Instant>,
}

impl Group {
    fn new() -> Group {
        Group {
            state: GroupState::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            instances: HashMap::new(),
            pending: HashMap::new(),
            rebalance_deadline: None,
            not_before: None,
        }
    }
}

/// A snapshot of one group for DescribeGroups.
#[derive(Clone, Debug)]
pub struct GroupDescription {
    pub state: GroupState,
    pub protocol_type: String,
    pub protocol: String,
    /// id, instance id, client id, client host, metadata (of the chosen protocol), assignment
    pub members: Vec<(String, Option<String>, String, String, Bytes, Bytes)>,
}

/// The parameters of a JoinGroup request.
#[derive(Clone, Debug)]
pub struct JoinRequest {
    pub group: String,
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    /// v4+: a new dynamic member first gets MEMBER_ID_REQUIRED and its id (KIP-394).
    pub require_known_member_id: bool,
}

#[derive(Debug)]
pub struct Coordinator {
    config: GroupConfig,
    groups: Mutex<HashMap<String, Group>>,
    next_member: AtomicU64,
}

impl Coordinator {
    /// A coordinator and its ticker thread (which ends when the coordinator is dropped).
    pub fn start(config: GroupConfig) -> Arc<Coordinator> {
        let c = Arc::new(Coordinator {
            config,
            groups: Mutex::new(HashMap::new()),
            next_member: AtomicU64::new(1),
        });
        let weak: Weak<Coordinator> = Arc::downgrade(&c);
        let _ = std::thread::Builder::new()
            .name("keel-groups".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(50));
                match weak.upgrade() {
                    Some(c) => c.tick(Instant::now()),
                    None => return,
                }
            });
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Group>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_member_id(&self, client_id: &str) -> String {
        let n = self.next_member.fetch_add(1, Ordering::Relaxed);
        format!("{client_id}-{n:016x}-{:08x}", rand_u32())
    }

    /// JoinGroup: resolves when the rebalance completes (or at once with an error).
    pub fn join(&self, r: JoinRequest) -> oneshot::Receiver<JoinOutcome> {
        let (tx, rx) = oneshot::channel();
        let answer = |tx: oneshot::Sender<JoinOutcome>, o: JoinOutcome| {
            let _ = tx.send(o);
        };
        if r.group.is_empty() {
            answer(
                tx,
                JoinOutcome::error(ResponseError::InvalidGroupId, &r.member_id),
            );
            return rx;
        }
        if r.session_timeout < self.config.min_session_timeout
            || r.session_timeout > self.config.max_session_timeout
        {
            answer(
                tx,
                JoinOutcome::error(ResponseError::InvalidSessionTimeout, &r.member_id),
            );
            return rx;
        }
        let now = Instant::now();
        let mut groups = self.lock();
        let group = groups.entry(r.group.clone()).or_insert_with(Group::new);
        if r.protocols.is_empty()
            || r.protocol_type.is_empty()
            || (group.state != GroupState::Empty
                && (group.protocol_type.as_deref() != Some(r.protocol_type.as_str())
                    || !r.protocols.iter().any(|(name, _)| {
                        group
                            .members
                            .values()
                            .all(|m| m.protocols.iter().any(|(n, _)| n == name))
                    })))
        {
            answer(
                tx,
                JoinOutcome::error(ResponseError::InconsistentGroupProtocol, &r.member_id),
            );
            return rx;
        }
        // Who is this?
        let mut member_id = r.member_id.clone();
        if let Some(instance) = &r.instance_id {
            match group.instances.get(instance).cloned() {
                Some(old) if member_id.is_empty() || member_id != old => {
                    // A static member restarting: it takes over its old membership under a new id.
                    let new_id = self.new_member_id(&r.client_id);
                    if let Some(mut m) = group.members.remove(&old) {
                        if let Some(j) = m.joining.take() {
                            let _ =
                                j.send(JoinOutcome::error(ResponseError::FencedInstanceId, &old));
                        }
                        if let Some(s) = m.syncing.take() {
                            let _ = s.send(Err(ResponseError::FencedInstanceId));
                        }
                        m.id = new_id.clone();
                        m.last_seen = now;
                        let was_leader = group.leader.as_deref() == Some(old.as_str());
                        if was_leader {
                            group.leader = Some(new_id.clone());
                        }
                        group.members.insert(new_id.clone(), m);
                        group.instances.insert(instance.clone(), new_id.clone());
                        if group.state == GroupState::Stable && !was_leader {
                            // KIP-345: no rebalance for a follower coming back; it syncs to get its
                            // assignment back.
                            answer(
                                tx,
                                JoinOutcome {
                                    error: 0,
                                    generation: group.generation,
                                    protocol_type: group.protocol_type.clone(),
                                    protocol_name: group.protocol.clone(),
                                    leader: group.leader.clone().unwrap_or_default(),
                                    member_id: new_id,
                                    members: Vec::new(),
                                },
                            );
                            return rx;
                        }
                    }
                    member_id = new_id;
                }
                Some(_) => {}
                None => {
                    if member_id.is_empty() {
                        member_id = self.new_member_id(&r.client_id);
                    }
                    group.instances.insert(instance.clone(), member_id.clone());
                }
            }
        } else if member_id.is_empty() {
            member_id = self.new_member_id(&r.client_id);
            if r.require_known_member_id {
                // KIP-394: the member rejoins with this id; until then it is not a member.
                group
                    .pending
                    .insert(member_id.clone(), now + r.session_timeout);
                answer(
                    tx,
                    JoinOutcome::error(ResponseError::MemberIdRequired, &member_id),
                );
                return rx;
            }
        } else if group.pending.remove(&member_id).is_some() {
            // The second join of KIP-394: now it becomes a member.
        } else if !group.members.contains_key(&member_id) {
            answer(
                tx,
                JoinOutcome::error(ResponseError::UnknownMemberId, &member_id),
            );
            return rx;
        }
        if !group.members.contains_key(&member_id) && group.members.len() >= self.config.max_size {
            answer(
                tx,
                JoinOutcome::error(ResponseError::GroupMaxSizeReached, &member_id),
            );
            return rx;
        }
        let member = group
            .members
            .entry(member_id.clone())
            .or_insert_with(|| Member {
                id: member_id.clone(),
                instance_id: r.instance_id.clone(),
                client_id: r.client_id.clone(),
                client_host: r.client_host.clone(),
                session_timeout: r.session_timeout,
                rebalance_timeout: r.rebalance_timeout,
                protocol_type: r.protocol_type.clone(),
                protocols: Vec::new(),
                assignment: Bytes::new(),
                joining: None,
                syncing: None,
                last_seen: now,
            });
        member.session_timeout = r.session_timeout;
        member.rebalance_timeout = r.rebalance_timeout;
        member.protocols = r.protocols.clone();
        member.protocol_type = r.protocol_type.clone();
        member.last_seen = now;
        if let Some(old) = member.joining.replace(tx) {
            let _ = old.send(JoinOutcome::error(
                ResponseError::RebalanceInProgress,
                &member_id,
            ));
        }
        if group.protocol_type.is_none() {
            group.protocol_type = Some(r.protocol_type.clone());
        }
        if group.state != GroupState::PreparingRebalance {
            self.prepare_rebalance(group, now);
        }
        Self::try_complete_join(group, now);
        rx
    }

    fn prepare_rebalance(&self, group: &mut Group, now: Instant) {
        // Members waiting in SyncGroup must rejoin.
        for m in group.members.values_mut() {
            if let Some(s) = m.syncing.take() {
                let _ = s.send(Err(ResponseError::RebalanceInProgress));
            }
        }
        let timeout = group
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or(Duration::from_secs(60));
        if group.state == GroupState::Empty {
            group.not_before = Some(now + self.config.initial_rebalance_delay);
        }
        group.rebalance_deadline = Some(now + timeout);
        group.state = GroupState::PreparingRebalance;
    }

    /// Complete the join phase if every member has rejoined (and the initial delay is over), or
    /// if `force` (the rebalance timeout passed: members that did not rejoin are removed).
    fn try_complete_join(group: &mut Group, now: Instant) -> bool {
        Self::complete_join(group, now, false)
    }

    fn complete_join(group: &mut Group, now: Instant, force: bool) -> bool {
        if group.state != GroupState::PreparingRebalance {
            return false;
        }
        let all_joined = group.members.values().all(|m| m.joining.is_some());
        let delay_over = group.not_before.is_none_or(|t| now >= t);
        if !(force || (all_joined && delay_over)) {
            return false;
        }
        // Members that did not rejoin in time are out.
        let gone: Vec<String> = group
            .members
            .values()
            .filter(|m| m.joining.is_none())
            .map(|m| m.id.clone())
            .collect();
        for id in gone {
            if let Some(m) = group.members.remove(&id) {
                if let Some(i) = m.instance_id {
                    group.instances.remove(&i);
                }
            }
        }
        group.generation += 1;
        group.not_before = None;
        group.rebalance_deadline = None;
        if group.members.is_empty() {
            group.state = GroupState::Empty;
            group.protocol = None;
            group.leader = None;
            group.protocol_type = None;
            return true;
        }
        // The protocol: the leader's most preferred one that every member supports.
        let leader = match &group.leader {
            Some(l) if group.members.contains_key(l) => l.clone(),
            _ => group.members.keys().next().cloned().expect("a member"),
        };
        let protocol = group.members[&leader]
            .protocols
            .iter()
            .map(|(n, _)| n.clone())
            .find(|name| {
                group
                    .members
                    .values()
                    .all(|m| m.protocols.iter().any(|(n, _)| n == name))
            });
        group.leader = Some(leader.clone());
        group.protocol = protocol.clone();
        group.state = GroupState::CompletingRebalance;
        let roster: Vec<(String, Option<String>, Bytes)> = group
            .members
            .values()
            .map(|m| {
                let metadata = m.metadata_for(protocol.as_ref());
                (m.id.clone(), m.instance_id.clone(), metadata)
            })
            .collect();
        for m in group.members.values_mut() {
            m.assignment = Bytes::new();
            m.last_seen = now;
            if let Some(j) = m.joining.take() {
                let _ = j.send(JoinOutcome {
                    error: 0,
                    generation: group.generation,
                    protocol_type: group.protocol_type.clone(),
                    protocol_name: protocol.clone(),
                    leader: leader.clone(),
                    member_id: m.id.clone(),
                    members: if m.id == leader {
                        roster.clone()
                    } else {
                        Vec::new()
                    },
                });
            }
        }
        true
    }

    /// Check a member and its generation (Heartbeat, SyncGroup, OffsetCommit).
    fn check_member(
        group: &Group,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
    ) -> Result<(), ResponseError> {
        if let Some(instance) = instance_id {
            if let Some(current) = group.instances.get(instance) {
                if current != member_id {
                    return Err(ResponseError::FencedInstanceId);
                }
            }
        }
        if !group.members.contains_key(member_id) {
            return Err(ResponseError::UnknownMemberId);
        }
        if generation != group.generation {
            return Err(ResponseError::IllegalGeneration);
        }
        Ok(())
    }

    /// SyncGroup: the leader hands out assignments; everyone gets theirs.
    pub fn sync(
        &self,
        group_id: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        assignments: Vec<(String, Bytes)>,
    ) -> oneshot::Receiver<SyncOutcome> {
        let (tx, rx) = oneshot::channel();
        let mut groups = self.lock();
        let Some(group) = groups.get_mut(group_id) else {
            let _ = tx.send(Err(ResponseError::UnknownMemberId));
            return rx;
        };
        if let Err(e) = Self::check_member(group, member_id, instance_id, generation) {
            let _ = tx.send(Err(e));
            return rx;
        }
        let names = (group.protocol_type.clone(), group.protocol.clone());
        match group.state {
            GroupState::Empty | GroupState::PreparingRebalance => {
                let _ = tx.send(Err(ResponseError::RebalanceInProgress));
            }
            GroupState::Stable => {
                let a = group.members[member_id].assignment.clone();
                let _ = tx.send(Ok((a, names.0, names.1)));
            }
            GroupState::CompletingRebalance => {
                let now = Instant::now();
                let m = group.members.get_mut(member_id).expect("checked");
                m.last_seen = now;
                m.syncing = Some(tx);
                if group.leader.as_deref() == Some(member_id) {
                    for (id, a) in assignments {
                        if let Some(m) = group.members.get_mut(&id) {
                            m.assignment = a;
                        }
                    }
                    group.state = GroupState::Stable;
                    for m in group.members.values_mut() {
                        if let Some(s) = m.syncing.take() {
                            let _ = s.send(Ok((
                                m.assignment.clone(),
                                names.0.clone(),
                                names.1.clone(),
                            )));
                        }
                    }
                }
            }
        }
        rx
    }

    pub fn heartbeat(
        &self,
        group_id: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
    ) -> Result<(), ResponseError> {
        let mut groups = self.lock();
        let group = groups
            .get_mut(group_id)
            .ok_or(ResponseError::UnknownMemberId)?;
        Self::check_member(group, member_id, instance_id, generation)?;
        group.members.get_mut(member_id).expect("checked").last_seen = Instant::now();
        match group.state {
            GroupState::PreparingRebalance => Err(ResponseError::RebalanceInProgress),
            _ => Ok(()),
        }
    }

    /// LeaveGroup for one member (by id, or by instance id for static members).
    pub fn leave(
        &self,
        group_id: &str,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> Result<(), ResponseError> {
        let mut groups = self.lock();
        let group = groups
            .get_mut(group_id)
            .ok_or(ResponseError::UnknownMemberId)?;
        let id = match instance_id {
            Some(i) => {
                let current = group
                    .instances
                    .get(i)
                    .cloned()
                    .ok_or(ResponseError::UnknownMemberId)?;
                if !member_id.is_empty() && current != member_id {
                    return Err(ResponseError::FencedInstanceId);
                }
                current
            }
            None => member_id.to_string(),
        };
        let m = group
            .members
            .remove(&id)
            .ok_or(ResponseError::UnknownMemberId)?;
        if let Some(i) = &m.instance_id {
            group.instances.remove(i);
        }
        self.after_departure(group, Instant::now());
        Ok(())
    }

    fn after_departure(&self, group: &mut Group, now: Instant) {
        match group.state {
            GroupState::Stable | GroupState::CompletingRebalance => {
                if group.members.is_empty() {
                    group.state = GroupState::Empty;
                    group.generation += 1;
                    group.leader = None;
                    group.protocol = None;
                    group.protocol_type = None;
                } else {
                    self.prepare_rebalance(group, now);
                }
            }
            GroupState::PreparingRebalance => {
                Self::try_complete_join(group, now);
            }
            GroupState::Empty => {}
        }
    }

    /// Expire sessions and end overdue rebalances.
    pub fn tick(&self, now: Instant) {
        let mut groups = self.lock();
        for group in groups.values_mut() {
            group.pending.retain(|_, until| *until > now);
            let expired: Vec<String> = group
                .members
                .values()
                .filter(|m| {
                    m.joining.is_none() && now.duration_since(m.last_seen) > m.session_timeout
                })
                .map(|m| m.id.clone())
                .collect();
            if !expired.is_empty() {
                for id in &expired {
                    if let Some(m) = group.members.remove(id) {
                        tracing::info!(member = %id, "group member session expired");
                        if let Some(i) = m.instance_id {
                            group.instances.remove(&i);
                        }
                    }
                }
                self.after_departure(group, now);
            }
            if group.state == GroupState::PreparingRebalance {
                if group.rebalance_deadline.is_some_and(|d| now >= d) {
                    Self::complete_join(group, now, true);
                } else {
                    Self::try_complete_join(group, now);
                }
            }
        }
    }

    /// For OffsetCommit: may this member commit now? `generation < 0` with an empty member id is
    /// a commit from outside any group membership, allowed while the group has no members.
    pub fn validate_commit(
        &self,
        group_id: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
    ) -> Result<(), ResponseError> {
        let groups = self.lock();
        let Some(group) = groups.get(group_id) else {
            return if generation < 0 {
                Ok(())
            } else {
                Err(ResponseError::IllegalGeneration)
            };
        };
        if generation < 0 && member_id.is_empty() {
            return if group.members.is_empty() {
                Ok(())
            } else {
                Err(ResponseError::UnknownMemberId)
            };
        }
        Self::check_member(group, member_id, instance_id, generation)?;
        if group.state == GroupState::CompletingRebalance {
            return Err(ResponseError::RebalanceInProgress);
        }
        Ok(())
    }

    pub fn list(&self) -> Vec<(String, String, GroupState)> {
        let groups = self.lock();
        let mut out: Vec<_> = groups
            .iter()
            .map(|(id, g)| {
                (
                    id.clone(),
                    g.protocol_type.clone().unwrap_or_default(),
                    g.state,
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn describe(&self, group_id: &str) -> Option<GroupDescription> {
        let groups = self.lock();
        let g = groups.get(group_id)?;
        Some(GroupDescription {
            state: g.state,
            protocol_type: g.protocol_type.clone().unwrap_or_default(),
            protocol: g.protocol.clone().unwrap_or_default(),
            members: g
                .members
                .values()
                .map(|m| {
                    let metadata = m.metadata_for(g.protocol.as_ref());
                    (
                        m.id.clone(),
                        m.instance_id.clone(),
                        m.client_id.clone(),
                        m.client_host.clone(),
                        metadata,
                        m.assignment.clone(),
                    )
                })
                .collect(),
        })
    }

    /// DeleteGroups: only a group without members. True if the coordinator knew the group.
    pub fn delete(&self, group_id: &str) -> Result<bool, ResponseError> {
        let mut groups = self.lock();
        match groups.get(group_id) {
            Some(g) if !g.members.is_empty() => Err(ResponseError::NonEmptyGroup),
            _ => Ok(groups.remove(group_id).is_some()),
        }
    }
}

fn rand_u32() -> u32 {
    uuid::Uuid::new_v4().as_u128() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GroupConfig {
        GroupConfig {
            initial_rebalance_delay: Duration::ZERO,
            ..Default::default()
        }
    }

    fn join_req(group: &str, member: &str) -> JoinRequest {
        JoinRequest {
            group: group.into(),
            member_id: member.into(),
            instance_id: None,
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(10),
            protocol_type: "consumer".into(),
            protocols: vec![("range".into(), Bytes::from_static(b"sub"))],
            require_known_member_id: true,
        }
    }

    fn now<T>(rx: oneshot::Receiver<T>) -> Option<T> {
        let mut rx = rx;
        rx.try_recv().ok().flatten()
    }

    #[test]
    fn two_members_join_sync_and_rebalance_when_one_leaves() {
        let c = Coordinator::start(config());
        // KIP-394: first join gets an id.
        let first = now(c.join(join_req("g", ""))).unwrap();
        assert_eq!(first.error, ResponseError::MemberIdRequired.code());
        let a = first.member_id;
        let ra = c.join(join_req("g", &a));
        let ja = now(ra).expect("a lone member completes the join at once");
        assert_eq!(
            (ja.error, ja.generation, ja.leader.as_str()),
            (0, 1, a.as_str())
        );
        assert_eq!(ja.members.len(), 1);
        let s = now(c.sync(
            "g",
            &a,
            None,
            1,
            vec![(a.clone(), Bytes::from_static(b"all"))],
        ))
        .unwrap();
        assert_eq!(s.unwrap().0, Bytes::from_static(b"all"));
        // A second member: the first learns of the rebalance through its heartbeat.
        let b = now(c.join(join_req("g", ""))).unwrap().member_id;
        let rb = c.join(join_req("g", &b));
        assert_eq!(
            c.heartbeat("g", &a, None, 1),
            Err(ResponseError::RebalanceInProgress)
        );
        let ra = c.join(join_req("g", &a));
        let (ja, jb) = (now(ra).unwrap(), now(rb).unwrap());
        assert_eq!((ja.generation, jb.generation), (2, 2));
        assert_eq!(
            ja.members.len() + jb.members.len(),
            2,
            "only the leader gets the roster"
        );
        let leader = ja.leader.clone();
        let follower = if leader == a { b.clone() } else { a.clone() };
        let rf = c.sync("g", &follower, None, 2, vec![]);
        let rl = c.sync(
            "g",
            &leader,
            None,
            2,
            vec![
                (a.clone(), Bytes::from_static(b"p0")),
                (b.clone(), Bytes::from_static(b"p1")),
            ],
        );
        assert!(now(rf).unwrap().is_ok() && now(rl).unwrap().is_ok());
        assert_eq!(
            c.heartbeat("g", &a, None, 1),
            Err(ResponseError::IllegalGeneration)
        );
        c.leave("g", &b, None).unwrap();
        assert_eq!(
            c.describe("g").unwrap().state,
            GroupState::PreparingRebalance
        );
        let ja = now(c.join(join_req("g", &a))).unwrap();
        assert_eq!((ja.generation, ja.members.len()), (3, 1));
    }

    #[test]
    fn sessions_expire_and_overdue_rebalances_drop_the_silent() {
        let c = Coordinator::start(config());
        let mut r = join_req("g", "");
        r.require_known_member_id = false;
        let a = now(c.join(r.clone())).unwrap().member_id;
        let b_rx = c.join(r.clone());
        // b's join started a rebalance that a must rejoin; a stays silent past the deadline.
        assert!(now(b_rx).is_none());
        let later = Instant::now() + Duration::from_secs(11);
        c.tick(later);
        let desc = c.describe("g").unwrap();
        assert_eq!(desc.members.len(), 1, "a was dropped");
        assert!(desc.members[0].0 != a);
        // The remaining member goes silent too: its session expires and the group empties.
        c.tick(later + Duration::from_secs(30));
        assert_eq!(c.describe("g").unwrap().state, GroupState::Empty);
        assert!(c.delete("g").is_ok());
    }

    #[test]
    fn a_static_member_coming_back_keeps_its_assignment_without_a_rebalance() {
        let c = Coordinator::start(config());
        let with_instance = |i: &str| JoinRequest {
            instance_id: Some(i.into()),
            ..join_req("g", "")
        };
        let ja = now(c.join(with_instance("a"))).unwrap();
        assert_eq!(
            ja.error, 0,
            "static members need no MEMBER_ID_REQUIRED round"
        );
        let rb = c.join(with_instance("b"));
        let ja = now(c.join(JoinRequest {
            member_id: ja.member_id.clone(),
            ..with_instance("a")
        }))
        .unwrap();
        let jb = now(rb).unwrap();
        let (leader, follower) = if ja.leader == ja.member_id {
            (ja, jb)
        } else {
            (jb, ja)
        };
        let assignments = vec![
            (leader.member_id.clone(), Bytes::from_static(b"L")),
            (follower.member_id.clone(), Bytes::from_static(b"F")),
        ];
        let instance_of = |id: &str| {
            c.describe("g")
                .unwrap()
                .members
                .into_iter()
                .find(|m| m.0 == id)
                .unwrap()
                .1
                .unwrap()
        };
        let leader_instance = instance_of(&leader.member_id);
        let follower_instance = instance_of(&follower.member_id);
        assert!(now(c.sync(
            "g",
            &leader.member_id,
            Some(&leader_instance),
            leader.generation,
            assignments
        ))
        .unwrap()
        .is_ok());
        // The follower restarts (new process, no member id): same generation, no rebalance.
        let back = now(c.join(with_instance(&follower_instance))).unwrap();
        assert_eq!((back.error, back.generation), (0, leader.generation));
        assert_ne!(back.member_id, follower.member_id);
        assert_eq!(c.describe("g").unwrap().state, GroupState::Stable);
        let got = now(c.sync(
            "g",
            &back.member_id,
            Some(&follower_instance),
            back.generation,
            vec![],
        ))
        .unwrap();
        assert_eq!(got.unwrap().0, Bytes::from_static(b"F"));
        // The old incarnation is fenced.
        assert_eq!(
            c.heartbeat(
                "g",
                &follower.member_id,
                Some(&follower_instance),
                back.generation
            ),
            Err(ResponseError::FencedInstanceId)
        );
    }

    #[test]
    fn commits_are_checked_against_membership() {
        let c = Coordinator::start(config());
        assert!(
            c.validate_commit("free", "", None, -1).is_ok(),
            "no group: a standalone commit"
        );
        let mut r = join_req("g", "");
        r.require_known_member_id = false;
        let j = now(c.join(r)).unwrap();
        assert_eq!(
            c.validate_commit("g", &j.member_id, None, j.generation),
            Err(ResponseError::RebalanceInProgress)
        );
        assert!(now(c.sync("g", &j.member_id, None, j.generation, vec![]))
            .unwrap()
            .is_ok());
        assert!(c
            .validate_commit("g", &j.member_id, None, j.generation)
            .is_ok());
        assert_eq!(
            c.validate_commit("g", "other", None, j.generation),
            Err(ResponseError::UnknownMemberId)
        );
        assert_eq!(
            c.validate_commit("g", &j.member_id, None, 99),
            Err(ResponseError::IllegalGeneration)
        );
        assert_eq!(
            c.validate_commit("g", "", None, -1),
            Err(ResponseError::UnknownMemberId)
        );
        assert_eq!(c.delete("g"), Err(ResponseError::NonEmptyGroup));
    }
}
