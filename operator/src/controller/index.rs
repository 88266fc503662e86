//! A cache's objects grouped by namespace and by the SLIM name they claim, kept from the same
//! watch events as the cache and sharing its objects. A reconcile reads the handful of objects it
//! needs (the Pods of its namespace, the other claims on its name) instead of copying and
//! scanning the whole cache: with 20,000 Pods and 10,000 Subscriptions, those scans were most of
//! the operator's CPU and made its work grow with the square of the cluster.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Pod;
use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;

use crate::api::{SlimChannel, Subscription};

/// What a kind is grouped by besides its namespace.
pub trait Claims {
    /// The SLIM name the object claims (a Subscription's route, a SlimChannel's channel), if any.
    fn claimed_name(&self) -> Option<&str>;
}

impl Claims for Subscription {
    fn claimed_name(&self) -> Option<&str> {
        Some(&self.spec.name)
    }
}

impl Claims for SlimChannel {
    fn claimed_name(&self) -> Option<&str> {
        Some(&self.spec.name)
    }
}

impl Claims for Pod {
    fn claimed_name(&self) -> Option<&str> {
        None
    }
}

/// Objects by key, and each object's key (to move it when its key changes).
struct Groups<K: Resource<DynamicType = ()>> {
    members: HashMap<String, HashMap<ObjectRef<K>, Arc<K>>>,
    key_of: HashMap<ObjectRef<K>, String>,
}

impl<K: Resource<DynamicType = ()>> Groups<K> {
    fn insert(&mut self, reference: ObjectRef<K>, key: String, object: Arc<K>) {
        self.remove(&reference);
        self.members.entry(key.clone()).or_default().insert(reference.clone(), object);
        self.key_of.insert(reference, key);
    }

    fn remove(&mut self, reference: &ObjectRef<K>) {
        let Some(key) = self.key_of.remove(reference) else { return };
        if let Some(group) = self.members.get_mut(&key) {
            group.remove(reference);
            if group.is_empty() {
                self.members.remove(&key);
            }
        }
    }
}

/// One grouping of a cache's objects.
struct Index<K: Resource<DynamicType = ()>> {
    key: fn(&K) -> Option<String>,
    groups: RwLock<Groups<K>>,
}

impl<K: Resource<DynamicType = ()> + Clone> Index<K> {
    fn new(key: fn(&K) -> Option<String>) -> Self {
        Self { key, groups: RwLock::new(Groups { members: HashMap::new(), key_of: HashMap::new() }) }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Groups<K>> {
        self.groups.write().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, groups: &mut Groups<K>, object: Arc<K>) {
        let reference = ObjectRef::from_obj(&*object);
        match (self.key)(&object) {
            Some(key) => groups.insert(reference, key, object),
            None => groups.remove(&reference),
        }
    }

    fn get(&self, key: &str) -> Vec<Arc<K>> {
        let groups = self.groups.read().unwrap_or_else(|p| p.into_inner());
        groups.members.get(key).map(|group| group.values().cloned().collect()).unwrap_or_default()
    }
}

/// A watched kind's cache with its groupings. Cloning shares them.
pub struct Cache<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    namespaces: Arc<Index<K>>,
    names: Arc<Index<K>>,
}

impl<K: Resource<DynamicType = ()> + 'static> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Self { store: self.store.clone(), namespaces: self.namespaces.clone(), names: self.names.clone() }
    }
}

impl<K> Cache<K>
where
    K: Resource<DynamicType = ()> + Claims + Clone + 'static,
{
    /// Groups `store`'s objects; [`Cache::follow`] must then see every event the store takes.
    pub fn new(store: Store<K>) -> Self {
        Self {
            store,
            namespaces: Arc::new(Index::new(|o: &K| o.meta().namespace.clone())),
            names: Arc::new(Index::new(|o: &K| o.claimed_name().map(str::to_owned))),
        }
    }

    /// Takes one watch event, after the store has (the groupings share the store's objects).
    pub fn follow(&self, event: &watcher::Event<K>) {
        match event {
            watcher::Event::Apply(object) => {
                if let Some(object) = self.store.get(&ObjectRef::from_obj(object)) {
                    for index in [&self.namespaces, &self.names] {
                        index.put(&mut index.write(), object.clone());
                    }
                }
            }
            watcher::Event::Delete(object) => {
                let reference = ObjectRef::from_obj(object);
                for index in [&self.namespaces, &self.names] {
                    index.write().remove(&reference);
                }
            }
            // A relist replaces the store at its end: rebuild from it.
            watcher::Event::InitDone => {
                let objects = self.store.state();
                for index in [&self.namespaces, &self.names] {
                    let mut groups = index.write();
                    *groups = Groups { members: HashMap::new(), key_of: HashMap::new() };
                    for object in &objects {
                        index.put(&mut groups, object.clone());
                    }
                }
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }

    /// The cache itself (what the controller runs on).
    pub fn store(&self) -> &Store<K> {
        &self.store
    }

    /// Every object: for the few readers that need them all (scrape-time metrics, link users).
    pub fn state(&self) -> Vec<Arc<K>> {
        self.store.state()
    }

    /// The objects in `namespace`.
    pub fn in_namespace(&self, namespace: &str) -> Vec<Arc<K>> {
        self.namespaces.get(namespace)
    }

    /// The objects that claim the SLIM name `name`.
    pub fn claiming(&self, name: &str) -> Vec<Arc<K>> {
        self.names.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector;

    fn sub(namespace: &str, name: &str, route: &str) -> Subscription {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"name": route, "nodes": {"endpoints": ["http://127.0.0.1:1"]}, "link": {"endpoint": "http://127.0.0.1:2"}}
        }))
        .expect("subscription")
    }

    /// The store and the cache fed one event, as the watch does.
    fn feed(
        writer: &mut reflector::store::Writer<Subscription>,
        cache: &Cache<Subscription>,
        event: watcher::Event<Subscription>,
    ) {
        writer.apply_watcher_event(&event);
        cache.follow(&event);
    }

    fn names(objects: Vec<Arc<Subscription>>) -> Vec<String> {
        let mut names: Vec<String> = objects.iter().map(|o| o.meta().name.clone().unwrap_or_default()).collect();
        names.sort();
        names
    }

    #[test]
    fn objects_are_grouped_moved_and_forgotten_as_the_watch_says() {
        let (store, mut writer) = reflector::store::<Subscription>();
        let cache = Cache::new(store);
        feed(&mut writer, &cache, watcher::Event::Apply(sub("a", "one", "org/ns/x")));
        feed(&mut writer, &cache, watcher::Event::Apply(sub("a", "two", "org/ns/x")));
        feed(&mut writer, &cache, watcher::Event::Apply(sub("b", "three", "org/ns/y")));
        assert_eq!(names(cache.in_namespace("a")), ["one", "two"]);
        assert_eq!(names(cache.claiming("org/ns/x")), ["one", "two"]);
        assert!(cache.in_namespace("c").is_empty() && cache.claiming("org/ns/z").is_empty());

        // `two` now claims another name: it moves.
        feed(&mut writer, &cache, watcher::Event::Apply(sub("a", "two", "org/ns/y")));
        assert_eq!(names(cache.claiming("org/ns/x")), ["one"]);
        assert_eq!(names(cache.claiming("org/ns/y")), ["three", "two"]);

        feed(&mut writer, &cache, watcher::Event::Delete(sub("a", "one", "org/ns/x")));
        assert!(cache.claiming("org/ns/x").is_empty());
        assert_eq!(names(cache.in_namespace("a")), ["two"]);
    }

    #[test]
    fn a_relist_replaces_the_groups_with_what_the_store_holds() {
        let (store, mut writer) = reflector::store::<Subscription>();
        let cache = Cache::new(store);
        feed(&mut writer, &cache, watcher::Event::Apply(sub("a", "gone", "org/ns/x")));
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(sub("a", "kept", "org/ns/x")),
            watcher::Event::InitApply(sub("b", "new", "org/ns/y")),
        ] {
            feed(&mut writer, &cache, event);
        }
        assert_eq!(names(cache.claiming("org/ns/x")), ["gone"], "the old view until the relist is complete");
        feed(&mut writer, &cache, watcher::Event::InitDone);
        assert_eq!(names(cache.claiming("org/ns/x")), ["kept"]);
        assert_eq!(names(cache.in_namespace("b")), ["new"]);
        assert_eq!(cache.state().len(), 2);
    }

    #[test]
    fn grouped_objects_are_the_stores_own() {
        let (store, mut writer) = reflector::store::<Subscription>();
        let cache = Cache::new(store.clone());
        feed(&mut writer, &cache, watcher::Event::Apply(sub("a", "one", "org/ns/x")));
        let from_store = store.state().pop().expect("cached");
        let from_index = cache.in_namespace("a").pop().expect("grouped");
        assert!(Arc::ptr_eq(&from_store, &from_index), "one copy of each object");
    }
}
