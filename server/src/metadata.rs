//! Cluster metadata of a single node: topics (id, partition count, leader epoch, config
//! overrides) and the producer-id allocator, kept as small files under `<data dir>/.keel/`.
//!
//! Every change is written to a temporary file, fsynced, renamed over the old one and the
//! directory fsynced, so a crash leaves either the old or the new version. The engine ignores the
//! `.keel` directory (its name is not `<topic>-<partition>`).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use keel_engine::PartitionId;
use uuid::Uuid;

use crate::config::{parse_properties, TopicConfig};
use crate::error::{ConfigError, Error};
use crate::producers::ProducerStates;

/// Kafka's limit on topic names (file names must stay below 255 bytes with `-<partition>`).
pub const topic_name_length_max: usize = 249;

/// Producer ids are reserved on disk in blocks of this many, so a restart never reuses one.
const producer_id_block: i64 = 1000;

/// A topic name Kafka would accept: `[a-zA-Z0-9._-]{1,249}`, not `.` or `..`.
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= topic_name_length_max
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// One partition as the broker sees it: the leader epoch and replica set replication will use,
/// idempotent-producer state, and the fetches waiting for new data.
#[derive(Debug)]
pub struct Partition {
    pub id: PartitionId,
    pub index: i32,
    pub leader_epoch: i32,
    /// Broker ids holding a copy (today: this node).
    pub replicas: Vec<i32>,
    pub producers: Mutex<ProducerStates>,
    pub waiters: Waiters,
}

/// Long-polling fetches parked on a partition, woken when a produce to it completes.
#[derive(Debug, Default)]
pub struct Waiters(Mutex<Vec<futures::channel::oneshot::Sender<()>>>);

impl Waiters {
    pub fn register(&self) -> futures::channel::oneshot::Receiver<()> {
        let (tx, rx) = futures::channel::oneshot::channel();
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|w| !w.is_canceled());
        list.push(tx);
        rx
    }

    pub fn wake_all(&self) {
        let list = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for w in list {
            let _ = w.send(());
        }
    }
}

#[derive(Debug)]
pub struct Topic {
    pub name: Arc<str>,
    pub id: Uuid,
    pub config: TopicConfig,
    pub partitions: Vec<Arc<Partition>>,
}

impl Topic {
    fn new(
        name: &str,
        id: Uuid,
        count: u32,
        leader_epoch: i32,
        config: TopicConfig,
        node: i32,
    ) -> Topic {
        Topic {
            name: name.into(),
            id,
            config,
            partitions: (0..count)
                .map(|i| {
                    Arc::new(Partition {
                        id: PartitionId::new(name, i),
                        index: i as i32,
                        leader_epoch,
                        replicas: vec![node],
                        producers: Mutex::default(),
                        waiters: Waiters::default(),
                    })
                })
                .collect(),
        }
    }

    pub fn partition(&self, index: i32) -> Option<&Arc<Partition>> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.partitions.get(i))
    }

    fn to_properties(&self) -> String {
        let epoch = self.partitions.first().map_or(0, |p| p.leader_epoch);
        format!(
            "# keel topic metadata\ntopic.id={}\npartitions={}\nleader.epoch={epoch}\n{}",
            self.id,
            self.partitions.len(),
            self.config.to_properties()
        )
    }
}

pub type Topics = BTreeMap<Arc<str>, Arc<Topic>>;

/// The topic table: readers take a cheap snapshot; changes are serialised by `change`.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    node_id: i32,
    topics: RwLock<Arc<Topics>>,
    /// Held across a whole create or delete (including its file writes).
    pub change: futures::lock::Mutex<()>,
    producer_ids: Mutex<ProducerIds>,
}

#[derive(Debug)]
struct ProducerIds {
    next: i64,
    reserved_until: i64,
}

impl Registry {
    /// Load every topic file under `<data_dir>/.keel/`; `defaults` fills what a topic does not override.
    pub fn load(data_dir: &Path, defaults: &TopicConfig, node_id: i32) -> Result<Registry, Error> {
        let dir = data_dir.join(".keel");
        let topics_dir = dir.join("topics");
        fs::create_dir_all(&topics_dir)
            .map_err(|e| Error::io("create", topics_dir.display(), e))?;
        let mut topics = Topics::new();
        let entries =
            fs::read_dir(&topics_dir).map_err(|e| Error::io("list", topics_dir.display(), e))?;
        for entry in entries {
            let path = entry
                .map_err(|e| Error::io("list", topics_dir.display(), e))?
                .path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".properties"))
            else {
                // A leftover temporary file from an interrupted write: the rename never happened.
                let _ = fs::remove_file(&path);
                continue;
            };
            let topic = read_topic(&path, name, defaults, node_id)?;
            topics.insert(topic.name.clone(), Arc::new(topic));
        }
        let ids_path = dir.join("producer-ids");
        let next = match fs::read_to_string(&ids_path) {
            Ok(text) => text.trim().parse().map_err(|_| Error::Metadata {
                path: ids_path.clone(),
                why: format!("expected a number, found {:?}", text.trim()),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(Error::io("read", ids_path.display(), e)),
        };
        Ok(Registry {
            dir,
            node_id,
            topics: RwLock::new(Arc::new(topics)),
            change: futures::lock::Mutex::new(()),
            producer_ids: Mutex::new(ProducerIds {
                next,
                reserved_until: next,
            }),
        })
    }

    pub fn snapshot(&self) -> Arc<Topics> {
        self.topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.snapshot().get(name).cloned()
    }

    pub fn partition(&self, topic: &str, index: i32) -> Option<Arc<Partition>> {
        self.topic(topic).and_then(|t| t.partition(index).cloned())
    }

    pub fn topic_by_id(&self, id: Uuid) -> Option<Arc<Topic>> {
        self.snapshot().values().find(|t| t.id == id).cloned()
    }

    pub fn producer_snapshot_path(&self, id: &PartitionId) -> PathBuf {
        self.dir.join("producers").join(format!("{id}.snapshot"))
    }

    /// Persist and publish a new topic. The caller holds `change` and has checked the name.
    /// Blocking (small file writes and fsyncs): call off the I/O threads.
    pub fn add_topic(
        &self,
        name: &str,
        partitions: u32,
        config: TopicConfig,
    ) -> Result<Arc<Topic>, Error> {
        let topic = Arc::new(Topic::new(
            name,
            Uuid::new_v4(),
            partitions,
            0,
            config,
            self.node_id,
        ));
        let path = self.dir.join("topics").join(format!("{name}.properties"));
        write_durably(&path, topic.to_properties().as_bytes())?;
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        let mut next = (**topics).clone();
        next.insert(topic.name.clone(), topic.clone());
        *topics = Arc::new(next);
        Ok(topic)
    }

    /// Forget a topic (its file first: a crash after this leaves orphan partitions that the next
    /// start deletes). Blocking.
    pub fn remove_topic(&self, name: &str) -> Result<Option<Arc<Topic>>, Error> {
        // A tombstone first: partitions without metadata are deleted at start only if one says
        // so; any other orphan is adopted, never deleted (lost metadata must not lose data).
        write_durably(&self.dir.join("deleted").join(name), b"")?;
        let path = self.dir.join("topics").join(format!("{name}.properties"));
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().expect("topics dir"))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", path.display(), e)),
        }
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        let mut next = (**topics).clone();
        let removed = next.remove(name);
        *topics = Arc::new(next);
        Ok(removed)
    }

    /// Topics whose deletion started (tombstone written) and may not have finished.
    pub fn pending_deletions(&self) -> Vec<String> {
        fs::read_dir(self.dir.join("deleted"))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| valid_topic_name(n))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The topic's partitions are gone: drop its tombstone.
    pub fn finish_deletion(&self, name: &str) {
        let _ = fs::remove_file(self.dir.join("deleted").join(name));
    }

    /// A fresh producer id. Ids are reserved on disk a block at a time (blocking when a block is
    /// used up), so one is never handed out twice, even across crashes.
    pub fn allocate_producer_id(&self) -> Result<i64, Error> {
        let mut ids = self.producer_ids.lock().unwrap_or_else(|e| e.into_inner());
        if ids.next >= ids.reserved_until {
            let until = ids.next + producer_id_block;
            write_durably(&self.dir.join("producer-ids"), until.to_string().as_bytes())?;
            ids.reserved_until = until;
        }
        let id = ids.next;
        ids.next += 1;
        Ok(id)
    }
}

fn read_topic(
    path: &Path,
    name: &str,
    defaults: &TopicConfig,
    node_id: i32,
) -> Result<Topic, Error> {
    let damaged = |why: String| Error::Metadata {
        path: path.to_owned(),
        why,
    };
    let text = fs::read_to_string(path).map_err(|e| Error::io("read", path.display(), e))?;
    let (mut id, mut count, mut epoch) = (None, None, 0);
    let mut config = defaults.clone();
    config.overrides.clear();
    let pairs = parse_properties(&text).map_err(|e| damaged(e.to_string()))?;
    for (key, value) in pairs {
        match key.as_str() {
            "topic.id" => id = Some(Uuid::parse_str(&value).map_err(|e| damaged(e.to_string()))?),
            "partitions" => count = Some(value.parse::<u32>().map_err(|e| damaged(e.to_string()))?),
            "leader.epoch" => {
                epoch = value
                    .parse()
                    .map_err(|_| damaged("bad leader.epoch".into()))?
            }
            _ => config
                .set(&key, &value)
                .map_err(|e: ConfigError| damaged(e.to_string()))?,
        }
    }
    let id = id.ok_or_else(|| damaged("no topic.id".into()))?;
    let count = count
        .filter(|&c| c > 0)
        .ok_or_else(|| damaged("no partitions".into()))?;
    if !valid_topic_name(name) {
        return Err(damaged(format!("invalid topic name {name:?}")));
    }
    Ok(Topic::new(name, id, count, epoch, config, node_id))
}

/// Write `bytes` to `path` so that a crash leaves the old or the new contents, never a mix.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path.parent().expect("a file path");
    fs::create_dir_all(dir).map_err(|e| Error::io("create", dir.display(), e))?;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| Error::io("write", tmp.display(), e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io("rename", path.display(), e))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync", dir.display(), e))
}

/// Run blocking work (metadata file writes) on its own thread and await it from any runtime, so
/// an I/O shard's event loop never waits for an fsync of a metadata file.
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = futures::channel::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    rx.await.expect("the metadata thread does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_and_producer_ids_survive_reload() {
        let dir = tempfile::tempdir().unwrap();
        let defaults = TopicConfig::default();
        let r = Registry::load(dir.path(), &defaults, 0).unwrap();
        let mut config = defaults.clone();
        config.set("retention.ms", "1000").unwrap();
        let t = r.add_topic("orders", 3, config).unwrap();
        let a = r.allocate_producer_id().unwrap();
        let b = r.allocate_producer_id().unwrap();
        assert_eq!(b, a + 1);
        drop(r);
        let r = Registry::load(dir.path(), &defaults, 0).unwrap();
        let again = r.topic("orders").unwrap();
        assert_eq!((again.id, again.partitions.len()), (t.id, 3));
        assert_eq!(again.config.retention_ms, Some(1000));
        assert!(
            r.allocate_producer_id().unwrap() > b,
            "ids are never reused"
        );
        r.remove_topic("orders").unwrap();
        assert!(Registry::load(dir.path(), &defaults, 0)
            .unwrap()
            .topic("orders")
            .is_none());
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(valid_topic_name("a.b_c-D9"));
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(250)] {
            assert!(!valid_topic_name(bad), "{bad:?}");
        }
    }
}
