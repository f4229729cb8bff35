//! Verified-token cache: a token that passed the signature check with a given key set is not
//! checked again; issuer, time and audience still are on every hit. Bounded; entries go when
//! the token expires or the keys change.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::Claims;

pub struct TokenCache {
    cap: usize,
    /// foldhash, seeded per process: a token is hashed on every request, and SipHash over a
    /// whole token cost more than the lookup. Only tokens whose signature verified are ever
    /// inserted, so a client cannot fill the table with colliding keys.
    map: Mutex<HashMap<Box<str>, Entry, foldhash::fast::RandomState>>,
}

/// (provider uid, key-set generation) that verified a token's signature.
pub type VerifiedBy = (u64, u64);

#[derive(Clone)]
struct Entry {
    verified_by: VerifiedBy,
    /// Shared with every request that carries the token: a hit copies nothing.
    claims: Arc<Claims>,
}

impl TokenCache {
    pub fn new(cap: usize) -> TokenCache {
        TokenCache {
            cap,
            map: Mutex::new(HashMap::with_capacity_and_hasher(
                cap.min(4096),
                foldhash::fast::RandomState::default(),
            )),
        }
    }

    pub fn enabled(&self) -> bool {
        self.cap > 0
    }

    /// Claims of a token already verified by `provider` with key-set `generation`.
    pub fn get(&self, token: &str, provider: u64, generation: u64) -> Option<Arc<Claims>> {
        if self.cap == 0 {
            return None;
        }
        let map = self.map.lock().unwrap();
        map.get(token)
            .filter(|e| e.verified_by == (provider, generation))
            .map(|e| e.claims.clone())
    }

    /// A token verified before: by which provider and key set, and its claims.
    pub fn entry(&self, token: &str) -> Option<(VerifiedBy, Arc<Claims>)> {
        if self.cap == 0 {
            return None;
        }
        let map = self.map.lock().unwrap();
        map.get(token).map(|e| (e.verified_by, e.claims.clone()))
    }

    pub fn put(&self, token: &str, provider: u64, generation: u64, claims: &Arc<Claims>, now: i64) {
        if self.cap == 0 || token.len() > super::MAX_TOKEN_BYTES {
            return;
        }
        let mut map = self.map.lock().unwrap();
        if map.len() >= self.cap {
            // Drop expired entries, then as many others as needed to get back under 90%.
            map.retain(|_, e| {
                e.claims
                    .exp
                    .is_none_or(|x| x + super::CLOCK_SKEW_SECS >= now)
            });
            let excess = map.len().saturating_sub(self.cap * 9 / 10);
            if excess > 0 {
                let victims: Vec<Box<str>> = map.keys().take(excess).cloned().collect();
                for k in victims {
                    map.remove(&k);
                }
            }
        }
        map.insert(
            token.into(),
            Entry {
                verified_by: (provider, generation),
                claims: claims.clone(),
            },
        );
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
