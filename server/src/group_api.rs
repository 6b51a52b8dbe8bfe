//! The group APIs on the wire: FindCoordinator, JoinGroup, SyncGroup, Heartbeat, LeaveGroup,
//! OffsetCommit, OffsetFetch, ListGroups, DescribeGroups, DeleteGroups.

use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::find_coordinator_response::Coordinator as CoordinatorEntry;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest,
    DescribeGroupsResponse, FindCoordinatorRequest, FindCoordinatorResponse, GroupId,
    HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest,
    LeaveGroupResponse, ListGroupsRequest, ListGroupsResponse, OffsetCommitRequest,
    OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, SyncGroupRequest,
    SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use crate::broker::{Broker, ClientInfo};
use crate::error::error_code;
use crate::groups::{GroupState, JoinRequest};
use crate::metrics::Metrics;
use crate::offsets::Committed;
use crate::protocol::str_bytes as s;

impl Broker {
    fn coordinator_address(&self) -> (String, u16) {
        self.advertised
            .get()
            .cloned()
            .unwrap_or_else(|| self.config.advertised(self.config.listen))
    }

    pub(crate) fn find_coordinator(
        &self,
        r: FindCoordinatorRequest,
        version: i16,
    ) -> FindCoordinatorResponse {
        let (host, port) = self.coordinator_address();
        let node = BrokerId(self.config.node_id);
        // Key type 0 is a consumer group; 1 (transactions) is not served.
        let error = if r.key_type == 0 {
            0
        } else {
            self.code(ResponseError::CoordinatorNotAvailable)
        };
        let mut response = FindCoordinatorResponse::default();
        if version >= 4 {
            response.coordinators = r
                .coordinator_keys
                .into_iter()
                .map(|key| {
                    let mut c = CoordinatorEntry::default()
                        .with_key(key)
                        .with_error_code(error);
                    if error == 0 {
                        c = c
                            .with_node_id(node)
                            .with_host(s(host.clone()))
                            .with_port(port as i32);
                    } else {
                        c = c.with_node_id(BrokerId(-1));
                    }
                    c
                })
                .collect();
        } else if error == 0 {
            response = response
                .with_node_id(node)
                .with_host(s(host))
                .with_port(port as i32);
        } else {
            response = response.with_error_code(error).with_node_id(BrokerId(-1));
        }
        response
    }

    pub(crate) async fn join_group(
        &self,
        r: JoinGroupRequest,
        version: i16,
        client: &ClientInfo,
    ) -> JoinGroupResponse {
        let rx = self.groups.join(JoinRequest {
            group: r.group_id.0.to_string(),
            member_id: r.member_id.to_string(),
            instance_id: r.group_instance_id.map(|i| i.to_string()),
            client_id: client.client_id.clone(),
            client_host: client
                .peer
                .map_or_else(String::new, |p| format!("/{}", p.ip())),
            session_timeout: Duration::from_millis(r.session_timeout_ms.max(0) as u64),
            // v0 has no rebalance timeout: Kafka uses the session timeout.
            rebalance_timeout: Duration::from_millis(
                if version >= 1 {
                    r.rebalance_timeout_ms
                } else {
                    r.session_timeout_ms
                }
                .max(0) as u64,
            ),
            protocol_type: r.protocol_type.to_string(),
            protocols: r
                .protocols
                .into_iter()
                .map(|p| (p.name.to_string(), p.metadata))
                .collect(),
            require_known_member_id: version >= 4,
        });
        let outcome = rx.await.unwrap_or_else(|_| crate::groups::JoinOutcome {
            error: ResponseError::CoordinatorNotAvailable.code(),
            generation: -1,
            ..Default::default()
        });
        self.metrics.error(outcome.error);
        JoinGroupResponse::default()
            .with_error_code(outcome.error)
            .with_generation_id(outcome.generation)
            .with_protocol_type(outcome.protocol_type.map(s))
            .with_protocol_name(Some(s(outcome.protocol_name.unwrap_or_default())))
            .with_leader(s(outcome.leader))
            .with_member_id(s(outcome.member_id))
            .with_members(
                outcome
                    .members
                    .into_iter()
                    .map(|(id, instance, metadata)| {
                        JoinGroupResponseMember::default()
                            .with_member_id(s(id))
                            .with_group_instance_id(if version >= 5 {
                                instance.map(s)
                            } else {
                                None
                            })
                            .with_metadata(metadata)
                    })
                    .collect(),
            )
    }

    pub(crate) async fn sync_group(&self, r: SyncGroupRequest) -> SyncGroupResponse {
        let rx = self.groups.sync(
            r.group_id.0.as_str(),
            r.member_id.as_str(),
            r.group_instance_id.as_ref().map(|i| i.as_str()),
            r.generation_id,
            r.assignments
                .into_iter()
                .map(|a| (a.member_id.to_string(), a.assignment))
                .collect(),
        );
        match rx.await {
            Ok(Ok((assignment, protocol_type, protocol_name))) => SyncGroupResponse::default()
                .with_assignment(assignment)
                .with_protocol_type(protocol_type.map(s))
                .with_protocol_name(protocol_name.map(s)),
            Ok(Err(e)) => SyncGroupResponse::default().with_error_code(self.code(e)),
            Err(_) => SyncGroupResponse::default()
                .with_error_code(self.code(ResponseError::RebalanceInProgress)),
        }
    }

    pub(crate) fn heartbeat(&self, r: HeartbeatRequest) -> HeartbeatResponse {
        let result = self.groups.heartbeat(
            r.group_id.0.as_str(),
            r.member_id.as_str(),
            r.group_instance_id.as_ref().map(|i| i.as_str()),
            r.generation_id,
        );
        HeartbeatResponse::default().with_error_code(result.err().map_or(0, |e| self.code(e)))
    }

    pub(crate) fn leave_group(&self, r: LeaveGroupRequest, version: i16) -> LeaveGroupResponse {
        let group = r.group_id.0.as_str();
        if version < 3 {
            let result = self.groups.leave(group, r.member_id.as_str(), None);
            return LeaveGroupResponse::default()
                .with_error_code(result.err().map_or(0, |e| self.code(e)));
        }
        let members = r
            .members
            .into_iter()
            .map(|m| {
                let result = self.groups.leave(
                    group,
                    m.member_id.as_str(),
                    m.group_instance_id.as_ref().map(|i| i.as_str()),
                );
                MemberResponse::default()
                    .with_member_id(m.member_id)
                    .with_group_instance_id(m.group_instance_id)
                    .with_error_code(result.err().map_or(0, |e| self.code(e)))
            })
            .collect();
        LeaveGroupResponse::default().with_members(members)
    }

    pub(crate) async fn offset_commit(
        self: &Arc<Self>,
        r: OffsetCommitRequest,
    ) -> OffsetCommitResponse {
        let group = r.group_id.0.to_string();
        // Group ids are stored with a 16-bit length (offsets.rs); Kafka's own strings are shorter.
        let allowed = if group.is_empty() || group.len() > i16::MAX as usize {
            Err(ResponseError::InvalidGroupId)
        } else {
            self.groups.validate_commit(
                &group,
                r.member_id.as_str(),
                r.group_instance_id.as_ref().map(|i| i.as_str()),
                r.generation_id_or_member_epoch,
            )
        };
        let now = crate::now_ms();
        let mut codes: Vec<(TopicName, Vec<(i32, i16)>)> = Vec::new();
        let mut entries = Vec::new();
        for t in &r.topics {
            let topic = self.registry.topic(t.name.as_str());
            let mut parts = Vec::new();
            for p in &t.partitions {
                let metadata = p.committed_metadata.as_ref().map_or("", |m| m.as_str());
                let code = match (&allowed, &topic) {
                    (Err(e), _) => e.code(),
                    (_, None) => ResponseError::UnknownTopicOrPartition.code(),
                    (_, Some(topic)) if topic.partition(p.partition_index).is_none() => {
                        ResponseError::UnknownTopicOrPartition.code()
                    }
                    _ if metadata.len() > self.config.offset_metadata_max_bytes => {
                        ResponseError::OffsetMetadataTooLarge.code()
                    }
                    _ => {
                        entries.push((
                            (t.name.to_string(), p.partition_index),
                            Committed {
                                offset: p.committed_offset,
                                leader_epoch: p.committed_leader_epoch,
                                metadata: metadata.to_string(),
                                commit_ms: now,
                            },
                        ));
                        0
                    }
                };
                parts.push((p.partition_index, code));
            }
            codes.push((t.name.clone(), parts));
        }
        // Acknowledged only once durable.
        let stored = self.offsets.commit(&group, entries).await;
        let storage_error = stored.err().map(|e| {
            tracing::warn!(group, error = %e, "offset commit failed");
            error_code(&e).code()
        });
        if storage_error.is_none() {
            Metrics::bump(&self.metrics.offset_commits);
        }
        OffsetCommitResponse::default().with_topics(
            codes
                .into_iter()
                .map(|(name, parts)| {
                    OffsetCommitResponseTopic::default()
                        .with_name(name)
                        .with_partitions(
                            parts
                                .into_iter()
                                .map(|(index, code)| {
                                    let code = if code == 0 {
                                        storage_error.unwrap_or(0)
                                    } else {
                                        code
                                    };
                                    self.metrics.error(code);
                                    OffsetCommitResponsePartition::default()
                                        .with_partition_index(index)
                                        .with_error_code(code)
                                })
                                .collect(),
                        )
                })
                .collect(),
        )
    }

    pub(crate) async fn offset_fetch(
        &self,
        r: OffsetFetchRequest,
        version: i16,
    ) -> OffsetFetchResponse {
        let group = r.group_id.0.to_string();
        let committed = self.offsets.fetch(&group).await;
        let entry = |topic: &str, partition: i32| {
            let mut e = OffsetFetchResponsePartition::default()
                .with_partition_index(partition)
                .with_committed_offset(-1)
                .with_metadata(Some(StrBytes::new()));
            if let Some(c) = committed.get(&(topic.to_string(), partition)) {
                e.committed_offset = c.offset;
                if version >= 5 {
                    e.committed_leader_epoch = c.leader_epoch;
                }
                e.metadata = Some(s(c.metadata.clone()));
            }
            e
        };
        let topics: Vec<OffsetFetchResponseTopic> = match r.topics {
            Some(topics) => topics
                .into_iter()
                .map(|t| {
                    let name = t.name.to_string();
                    OffsetFetchResponseTopic::default()
                        .with_partitions(
                            t.partition_indexes
                                .iter()
                                .map(|&p| entry(&name, p))
                                .collect(),
                        )
                        .with_name(t.name)
                })
                .collect(),
            None => {
                // All committed offsets of the group (v2+).
                let mut by_topic: std::collections::BTreeMap<String, Vec<i32>> = Default::default();
                for (topic, partition) in committed.keys() {
                    by_topic.entry(topic.clone()).or_default().push(*partition);
                }
                by_topic
                    .into_iter()
                    .map(|(name, parts)| {
                        OffsetFetchResponseTopic::default()
                            .with_partitions(parts.iter().map(|&p| entry(&name, p)).collect())
                            .with_name(TopicName(s(name)))
                    })
                    .collect()
            }
        };
        OffsetFetchResponse::default().with_topics(topics)
    }

    pub(crate) async fn list_groups(
        &self,
        r: ListGroupsRequest,
        version: i16,
    ) -> ListGroupsResponse {
        // Groups the coordinator knows, and groups that only have committed offsets (Empty), as
        // Kafka lists them.
        let mut all: std::collections::BTreeMap<String, (String, &'static str)> = self
            .groups
            .list()
            .into_iter()
            .map(|(id, protocol_type, state)| (id, (protocol_type, state.name())))
            .collect();
        for (group, _) in self.offsets.all().await {
            all.entry(group)
                .or_insert_with(|| (String::new(), GroupState::Empty.name()));
        }
        let groups = all
            .into_iter()
            .filter(|(_, (_, state))| {
                r.states_filter.is_empty() || r.states_filter.iter().any(|f| f.as_str() == *state)
            })
            .map(|(id, (protocol_type, state))| {
                let mut g = ListedGroup::default()
                    .with_group_id(GroupId(s(id)))
                    .with_protocol_type(s(protocol_type));
                if version >= 4 {
                    g.group_state = s(state);
                }
                g
            })
            .collect();
        ListGroupsResponse::default().with_groups(groups)
    }

    pub(crate) async fn describe_groups(&self, r: DescribeGroupsRequest) -> DescribeGroupsResponse {
        let mut groups = Vec::new();
        for id in r.groups {
            let described = self.groups.describe(id.0.as_str());
            let entry = match described {
                // Known only by its committed offsets: Empty, as Kafka reports it.
                None if !self.offsets.fetch(id.0.as_str()).await.is_empty() => {
                    DescribedGroup::default()
                        .with_group_id(id)
                        .with_group_state(s(GroupState::Empty.name()))
                }
                None => DescribedGroup::default()
                    .with_group_id(id)
                    .with_group_state(s("Dead")),
                Some(d) => DescribedGroup::default()
                    .with_group_id(id)
                    .with_group_state(s(d.state.name()))
                    .with_protocol_type(s(d.protocol_type))
                    .with_protocol_data(s(d.protocol))
                    .with_members(
                        d.members
                            .into_iter()
                            .map(|(member, instance, client, host, metadata, assignment)| {
                                DescribedGroupMember::default()
                                    .with_member_id(s(member))
                                    .with_group_instance_id(instance.map(s))
                                    .with_client_id(s(client))
                                    .with_client_host(s(host))
                                    .with_member_metadata(metadata)
                                    .with_member_assignment(assignment)
                            })
                            .collect(),
                    ),
            };
            groups.push(entry);
        }
        DescribeGroupsResponse::default().with_groups(groups)
    }

    pub(crate) async fn delete_groups(&self, r: DeleteGroupsRequest) -> DeleteGroupsResponse {
        let mut results = Vec::new();
        for id in r.groups_names {
            let code = match self.groups.delete(id.0.as_str()) {
                Err(e) => self.code(e),
                Ok(known) => match self.offsets.delete_group(id.0.as_str()).await {
                    Ok(had_offsets) if known || had_offsets => 0,
                    Ok(_) => self.code(ResponseError::GroupIdNotFound),
                    Err(e) => self.code(error_code(&e)),
                },
            };
            results.push(
                DeletableGroupResult::default()
                    .with_group_id(id)
                    .with_error_code(code),
            );
        }
        DeleteGroupsResponse::default().with_results(results)
    }
}
