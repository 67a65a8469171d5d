//! Credit reservations: metered requests of one wallet admitted in memory
//! against a block of its credits this process holds in the store, and
//! settled in batches by one writer task. A wallet's requests then take no
//! row lock each, and do not queue behind each other.
//!
//! # How it works
//!
//! - **Admission** ([`Reservations::admit`]). Each wallet has a block here:
//!   one leased hold in the store ([`Store::open_block`], reference
//!   `reservation:<process id>`), of which `free` is not yet promised to a
//!   request. A request quoted at `q` takes `q` from `free` under the
//!   block's mutex, with no database round trip. When `free` is short, the
//!   block grows ([`Store::grow_block`]) by up to
//!   [`ReserveConfig::block_quotes`] quotes, at least what the request
//!   lacks; one wallet's requests wait for one growth. A balance that
//!   cannot cover the request refuses it: a request is admitted only while
//!   `balance + free` covers it, so the number admitted is exactly what the
//!   wallet allows.
//! - **Settlement** ([`Reservations::settle`]). The job's cost `c <= q` is
//!   queued with its usage row; `q - c` goes back to `free` at once. The
//!   writer task takes everything queued (up to [`ReserveConfig::max_batch`])
//!   and writes it in one transaction ([`Store::settle_blocks`]): per
//!   block, the hold and the wallet's `held` drop by the sum of the costs
//!   and `total_spent` rises by it, each job with its ledger and usage
//!   rows. While one batch commits the next one gathers, so a busy wallet
//!   costs one transaction per batch, not two row locks per request. By
//!   default the caller waits for its batch to commit: an answer is
//!   released only once its bill is durable, as with per-request holds.
//!   With [`SettleOrder::AfterAnswer`] it does not wait
//!   ([`Reservations::settle_queued`]): the answer goes at once and the
//!   batch commits behind it, taking the commit off the request's path.
//! - **Give-back.** A block with no request in flight and nothing queued
//!   is given back (its rest released to the balance, the hold closed):
//!   with [`ReserveConfig::idle`] zero, in the transaction that settles its
//!   last request, so a wallet at rest has nothing held; otherwise once it
//!   has been idle that long (sequential requests then reuse one block).
//! - **Leases.** The writer renews its blocks' leases three times per lease
//!   ([`Store::renew_holds`]). When the process dies, nobody renews them,
//!   and [`Store::release_lapsed_holds`] (any coordinator's reaper, or the
//!   next start on SQLite) returns them whole to their wallets.
//!
//! # Why a crash cannot break the ledger
//!
//! The database alone is the truth. At every commit each block's hold
//! covers the quotes of its requests in flight plus the costs queued for
//! settlement: admission never promises more than the hold took from the
//! balance, and settlement moves a cost out of the hold only together with
//! its usage row and its ledger row. So `deposited = balance + held + spent`
//! holds after every transaction, and every credit charged has its usage
//! row. If the process dies between a job's end (its cost taken from `free`
//! in memory) and the commit of its batch, the database still holds that
//! cost inside the block and has no usage row for the job: when the lease
//! lapses the whole block returns to the balance. The client is never
//! billed for what is not recorded, and never spends more than was
//! deposited (everything admitted came out of the balance first); what is
//! lost is the operator's pay for the answers of the last batch, which the
//! caller had not yet released (it waits for the commit), except where the
//! connection delivered them anyway (always, with
//! [`SettleOrder::AfterAnswer`]). A block whose lease lapsed while the
//! process lived (the database was unreachable for a whole lease) is found
//! closed at the next settlement: its jobs are then charged from the
//! balance when it covers them, refused otherwise (their answers
//! withheld, or with [`SettleOrder::AfterAnswer`] recorded as failed and
//! unpaid), and the block is forgotten.
//!
//! # Durability
//!
//! The batches commit with the database's ordinary durability: on
//! PostgreSQL `synchronous_commit` stays on. Turning it off for the
//! writer's connection would keep the ledger consistent after a crash of
//! the database server (its recovery replays whole transactions or none),
//! but a committed batch whose answers were already released could then be
//! lost, billing nothing for delivered work; batching already makes the
//! flush cost per batch, not per request, so the trade is not taken.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, OwnedMutexGuard};

use crate::money::Micros;
use crate::store::{BlockCharge, BlockSettled, HoldId, Store, StoreError, UsageRow, WalletId};

/// How blocks are sized and settled.
#[derive(Clone, Debug)]
pub struct ReserveConfig {
    /// A block grows by this many quotes of the request that grows it.
    pub block_quotes: u32,
    /// How long a block stays after its wallet's last request ends; zero
    /// gives it back with that request's settlement.
    pub idle: Duration,
    /// The most jobs one settlement transaction writes.
    pub max_batch: usize,
    /// Whether an answer waits for its batch to commit.
    pub order: SettleOrder,
}

/// When a request's answer is released relative to the commit of its
/// settlement. Either way the ledger stays exact after a crash (see the
/// module comment); what differs is who bears the last batch: with
/// [`SettleOrder::BeforeAnswer`] an answer is withheld until it is billed,
/// with [`SettleOrder::AfterAnswer`] it is released at once and the batch
/// commits behind it, so a crash in between delivers those answers unpaid
/// (the operator's loss, never the client's) and a request costs no commit
/// on its own path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SettleOrder {
    /// The answer waits for its batch's commit.
    #[default]
    BeforeAnswer,
    /// The answer goes at once; its batch commits behind it.
    AfterAnswer,
}

impl Default for ReserveConfig {
    fn default() -> Self {
        ReserveConfig {
            block_quotes: 64,
            idle: Duration::ZERO,
            max_batch: 256,
            order: SettleOrder::BeforeAnswer,
        }
    }
}

/// One wallet's block. `state` is a std mutex, never held across an
/// `.await`; `grow` serialises the store calls that open, grow or give
/// back the block.
#[derive(Debug)]
struct Block {
    state: Mutex<BlockState>,
    grow: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug)]
struct BlockState {
    /// The block's hold in the store; `None` when the wallet has none here.
    hold: Option<HoldId>,
    /// The part of the hold no request in flight was promised, and no
    /// queued cost claims.
    free: Micros,
    /// Admitted requests not yet settled or released.
    in_flight: u32,
    /// Settlements queued for the writer and not yet written.
    pending: u32,
    /// The block is being given back: admissions wait for `grow`.
    closing: bool,
    last_active: Instant,
}

impl Block {
    fn state(&self) -> MutexGuard<'_, BlockState> {
        // A panic while the lock was held leaves amounts that are still
        // the best record there is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type Wallets = Arc<Mutex<HashMap<WalletId, Arc<Block>>>>;

fn lock_wallets(w: &Wallets) -> MutexGuard<'_, HashMap<WalletId, Arc<Block>>> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

enum Msg {
    /// Boxed: an item is a usage row, a close is a pointer.
    Settle(Box<Item>),
    /// Write what is queued, give every block back, then answer.
    Close(oneshot::Sender<()>),
}

struct Item {
    charge: BlockCharge,
    block: Arc<Block>,
    reply: oneshot::Sender<Result<BlockSettled, StoreError>>,
}

/// This process's credit reservations. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Reservations {
    store: Store,
    cfg: Arc<ReserveConfig>,
    /// `reservation:<process id>`: the reference of this process's blocks.
    reference: Arc<str>,
    wallets: Wallets,
    queue: mpsc::UnboundedSender<Msg>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Settle(_) => "Settle",
            Msg::Close(_) => "Close",
        })
    }
}

/// A settlement handed to the writer; it is written (or refused) whether
/// or not anyone waits for it, and [`Reservations::close`] writes it before
/// the process ends.
#[derive(Debug)]
pub struct Queued(oneshot::Receiver<Result<BlockSettled, StoreError>>);

impl Queued {
    /// How its batch ended.
    pub async fn written(self) -> Result<BlockSettled, StoreError> {
        self.0.await.unwrap_or(Err(StoreError::Corrupt(
            "the settlement writer has stopped",
        )))
    }
}

/// A request admitted against a block: the quote it may spend. End it with
/// [`Reservations::settle`] or [`Reservations::release`]; dropped, its
/// quote returns to the block unbilled.
#[derive(Debug)]
pub struct Ticket {
    block: Arc<Block>,
    wallet: WalletId,
    hold: HoldId,
    amount: Micros,
    open: bool,
}

impl Ticket {
    pub fn wallet(&self) -> &WalletId {
        &self.wallet
    }

    /// The quote admitted.
    pub fn amount(&self) -> Micros {
        self.amount
    }

    /// Close the ticket in memory: no longer in flight; `back` returns to
    /// the block's free part while the block is the one it came from.
    fn end(&mut self, back: Micros, queued: bool) {
        self.open = false;
        let mut s = self.block.state();
        s.in_flight = s.in_flight.saturating_sub(1);
        if queued {
            s.pending += 1;
        }
        s.last_active = Instant::now();
        if s.hold.as_ref() == Some(&self.hold) {
            s.free = Micros(s.free.0.saturating_add(back.0));
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.open {
            // Abandoned work is not billed: its quote is free again.
            let amount = self.amount;
            self.end(amount, false);
        }
    }
}

impl Reservations {
    /// Start the reservations of this process over `store` (its hold
    /// lease applies to the blocks), with their writer task. Must run
    /// inside a tokio runtime.
    pub fn start(store: Store, cfg: ReserveConfig) -> Reservations {
        let (queue, rx) = mpsc::unbounded_channel();
        let r = Reservations {
            store,
            cfg: Arc::new(ReserveConfig {
                block_quotes: cfg.block_quotes.max(1),
                max_batch: cfg.max_batch.max(1),
                ..cfg
            }),
            reference: format!("reservation:{}", uuid::Uuid::new_v4()).into(),
            wallets: Arc::default(),
            queue,
        };
        let writer = Writer {
            store: r.store.clone(),
            cfg: r.cfg.clone(),
            wallets: r.wallets.clone(),
        };
        tokio::spawn(writer.run(rx));
        r
    }

    /// The reference this process's blocks carry in the store.
    pub fn reference(&self) -> &str {
        &self.reference
    }

    fn block(&self, wallet: &WalletId) -> Arc<Block> {
        lock_wallets(&self.wallets)
            .entry(wallet.clone())
            .or_insert_with(|| {
                Arc::new(Block {
                    state: Mutex::new(BlockState {
                        hold: None,
                        free: Micros::ZERO,
                        in_flight: 0,
                        pending: 0,
                        closing: false,
                        last_active: Instant::now(),
                    }),
                    grow: Arc::default(),
                })
            })
            .clone()
    }

    /// Take `amount` from the block's free part, when it has that much.
    fn take_free(block: &Arc<Block>, wallet: &WalletId, amount: Micros) -> Option<Ticket> {
        let mut s = block.state();
        if s.closing || s.free < amount {
            return None;
        }
        let hold = s.hold.clone()?;
        s.free = Micros(s.free.0 - amount.0);
        s.in_flight += 1;
        s.last_active = Instant::now();
        Some(Ticket {
            block: block.clone(),
            wallet: wallet.clone(),
            hold,
            amount,
            open: true,
        })
    }

    /// Admit a request of `wallet` quoted at `amount`: from the block in
    /// memory, growing it from the balance when it is short.
    /// [`StoreError::InsufficientCredits`] (with what the wallet could
    /// still spend here) when the balance cannot cover it.
    pub async fn admit(&self, wallet: &WalletId, amount: Micros) -> Result<Ticket, StoreError> {
        let block = self.block(wallet);
        if let Some(t) = Self::take_free(&block, wallet, amount) {
            return Ok(t);
        }
        let _growing = block.grow.lock().await;
        // Requests admitted from memory meanwhile may take what a growth
        // added; a few rounds settle it.
        for _ in 0..8 {
            if let Some(t) = Self::take_free(&block, wallet, amount) {
                return Ok(t);
            }
            self.grow(&block, wallet, amount).await?;
        }
        Err(StoreError::Corrupt(
            "a credit reservation grew and still cannot admit",
        ))
    }

    /// Grow `block` (the caller holds its `grow`) by what `amount` lacks,
    /// up to [`ReserveConfig::block_quotes`] quotes; open it when it has no
    /// hold, or when its hold lapsed.
    async fn grow(
        &self,
        block: &Block,
        wallet: &WalletId,
        amount: Micros,
    ) -> Result<(), StoreError> {
        // A block being given back holds `grow`, so it is settled by now.
        let (hold, free) = {
            let s = block.state();
            (s.hold.clone(), s.free)
        };
        let target = Micros(amount.0.saturating_mul(u64::from(self.cfg.block_quotes)));
        let short = |balance: Micros, free: Micros| StoreError::InsufficientCredits {
            balance: Micros(balance.0.saturating_add(free.0)),
            needed: amount,
        };
        if let Some(h) = hold {
            let need = Micros(amount.0.saturating_sub(free.0));
            let want = Micros(target.0.saturating_sub(free.0)).max(need);
            match self.store.grow_block(&h, wallet, want, need).await {
                Ok(taken) => {
                    let mut s = block.state();
                    if s.hold.as_ref() == Some(&h) {
                        s.free = Micros(s.free.0.saturating_add(taken.0));
                    }
                    return Ok(());
                }
                Err(StoreError::InsufficientCredits { balance, .. }) => {
                    return Err(short(balance, free));
                }
                Err(StoreError::HoldClosed | StoreError::UnknownHold) => {
                    // Its lease lapsed (the store was out of reach for a
                    // whole lease): forget it and open another.
                    tracing::warn!(wallet = %wallet, hold = %h.0, "a credit reservation lapsed; opening another");
                    let mut s = block.state();
                    if s.hold.as_ref() == Some(&h) {
                        s.hold = None;
                        s.free = Micros::ZERO;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        match self
            .store
            .open_block(wallet, target, amount, &self.reference)
            .await
        {
            Ok((h, taken)) => {
                let mut s = block.state();
                s.hold = Some(h);
                s.free = taken;
                Ok(())
            }
            Err(StoreError::InsufficientCredits { balance, .. }) => {
                Err(short(balance, Micros::ZERO))
            }
            Err(e) => Err(e),
        }
    }

    /// Charge a finished request `charged` (at most its quote) with its
    /// usage row, priced at that: queued for the writer, and returned once
    /// written. [`BlockSettled::Refused`] when its block had lapsed and the
    /// balance could not pay; `Err` when the batch could not be written
    /// (nothing of it was; the quote is free again).
    pub async fn settle(
        &self,
        ticket: Ticket,
        charged: Micros,
        reference: &str,
        usage: Option<UsageRow>,
    ) -> Result<BlockSettled, StoreError> {
        self.settle_queued(ticket, charged, reference, usage)?
            .written()
            .await
    }

    /// Whether answers go before their settlement commits
    /// ([`SettleOrder::AfterAnswer`]).
    pub fn answers_first(&self) -> bool {
        self.cfg.order == SettleOrder::AfterAnswer
    }

    /// Queue a request's settlement as [`Reservations::settle`] does,
    /// without waiting for its batch: the cost has left the block's free
    /// part in memory, and [`Queued::written`] tells how the batch ended.
    pub fn settle_queued(
        &self,
        mut ticket: Ticket,
        charged: Micros,
        reference: &str,
        usage: Option<UsageRow>,
    ) -> Result<Queued, StoreError> {
        let charged = charged.min(ticket.amount);
        ticket.end(Micros(ticket.amount.0 - charged.0), true);
        self.enqueue(&ticket, charged, reference, usage)
    }

    /// A request that charges nothing: its quote is free again at once,
    /// and its usage row (if any) is written with the next batch.
    pub async fn release(
        &self,
        mut ticket: Ticket,
        reference: &str,
        usage: Option<UsageRow>,
    ) -> Result<(), StoreError> {
        let amount = ticket.amount;
        let queued = usage.is_some();
        ticket.end(amount, queued);
        if queued {
            self.queue_item(&ticket, Micros::ZERO, reference, usage)
                .await?;
        }
        Ok(())
    }

    async fn queue_item(
        &self,
        ticket: &Ticket,
        charged: Micros,
        reference: &str,
        usage: Option<UsageRow>,
    ) -> Result<BlockSettled, StoreError> {
        self.enqueue(ticket, charged, reference, usage)?
            .written()
            .await
    }

    fn enqueue(
        &self,
        ticket: &Ticket,
        charged: Micros,
        reference: &str,
        usage: Option<UsageRow>,
    ) -> Result<Queued, StoreError> {
        let (reply, rx) = oneshot::channel();
        let item = Item {
            charge: BlockCharge {
                hold: ticket.hold.clone(),
                wallet: ticket.wallet.clone(),
                charged,
                reference: reference.to_string(),
                usage,
            },
            block: ticket.block.clone(),
            reply,
        };
        if let Err(mpsc::error::SendError(Msg::Settle(item))) =
            self.queue.send(Msg::Settle(Box::new(item)))
        {
            undo(&item);
            return Err(StoreError::Corrupt("the settlement writer has stopped"));
        }
        Ok(Queued(rx))
    }

    /// Write everything queued and give every block back (shutdown).
    /// Requests still in flight are charged from the balance when they end.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.queue.send(Msg::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// The holds of this process's blocks.
    pub fn holds(&self) -> Vec<HoldId> {
        lock_wallets(&self.wallets)
            .values()
            .filter_map(|b| b.state().hold.clone())
            .collect()
    }
}

/// An item that was not written: its cost is free again in its block (the
/// hold in the store still covers it), and it is no longer pending.
fn undo(item: &Item) {
    let mut s = item.block.state();
    s.pending = s.pending.saturating_sub(1);
    if s.hold.as_ref() == Some(&item.charge.hold) {
        s.free = Micros(s.free.0.saturating_add(item.charge.charged.0));
    }
}

/// The settlement writer: batches, lease renewals and give-backs, in one
/// task so that they never race each other.
struct Writer {
    store: Store,
    cfg: Arc<ReserveConfig>,
    wallets: Wallets,
}

/// A block being given back: the hold, and `grow` held until it is closed.
struct GivingBack {
    block: Arc<Block>,
    hold: HoldId,
    _guard: OwnedMutexGuard<()>,
}

impl Writer {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let renew_every = (self.store.hold_lease() / 3).max(Duration::from_millis(200));
        let mut renew = tokio::time::interval(renew_every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sweep_every = if self.cfg.idle.is_zero() {
            Duration::from_secs(1)
        } else {
            (self.cfg.idle / 4).max(Duration::from_millis(50))
        };
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                msg = rx.recv() => msg,
                _ = renew.tick() => {
                    self.renew().await;
                    continue;
                }
                _ = sweep.tick() => {
                    self.sweep().await;
                    continue;
                }
            };
            let Some(first) = first else {
                // Every handle is gone: nothing can be admitted any more.
                self.give_back_all().await;
                return;
            };
            let mut batch = Vec::new();
            let mut closing = Vec::new();
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m {
                    Msg::Settle(item) => batch.push(*item),
                    Msg::Close(reply) => closing.push(reply),
                }
                if batch.len() >= self.cfg.max_batch {
                    break;
                }
                next = rx.try_recv().ok();
            }
            if !batch.is_empty() {
                self.write(batch).await;
            }
            if !closing.is_empty() {
                // Whatever was queued before the close is written first.
                while let Ok(m) = rx.try_recv() {
                    match m {
                        Msg::Settle(item) => self.write(vec![*item]).await,
                        Msg::Close(reply) => closing.push(reply),
                    }
                }
                self.give_back_all().await;
                for reply in closing {
                    let _ = reply.send(());
                }
            }
        }
    }

    /// Write one batch; the blocks it leaves idle are given back with it
    /// when [`ReserveConfig::idle`] is zero.
    async fn write(&self, batch: Vec<Item>) {
        let mut give = Vec::new();
        if self.cfg.idle.is_zero() {
            let mut seen: Vec<&Arc<Block>> = Vec::new();
            for item in &batch {
                if seen.iter().any(|b| Arc::ptr_eq(b, &item.block)) {
                    continue;
                }
                seen.push(&item.block);
                let queued_here = batch
                    .iter()
                    .filter(|i| Arc::ptr_eq(&i.block, &item.block))
                    .count();
                if let Some(g) = self.try_give_back(&item.block, queued_here, None) {
                    give.push(g);
                }
            }
        }
        let charges: Vec<BlockCharge> = batch.iter().map(|i| i.charge.clone()).collect();
        let holds: Vec<HoldId> = give.iter().map(|g| g.hold.clone()).collect();
        match self.store.settle_blocks(&charges, &holds).await {
            Ok(done) => {
                self.given_back(give, true);
                for (item, settled) in batch.into_iter().zip(done) {
                    finish(item, Ok(settled));
                }
            }
            Err(e) if batch.len() > 1 => {
                self.given_back(give, false);
                tracing::warn!(error = %e, jobs = batch.len(), "a settlement batch failed; writing its jobs one by one");
                for item in batch {
                    let r = self
                        .store
                        .settle_blocks(std::slice::from_ref(&item.charge), &[])
                        .await
                        .map(|mut v| v.pop().unwrap_or(BlockSettled::Refused));
                    finish(item, r);
                }
            }
            Err(e) => {
                self.given_back(give, false);
                tracing::error!(error = %e, "a settlement could not be written");
                for item in batch {
                    finish(
                        item,
                        Err(StoreError::Corrupt("the settlement could not be written")),
                    );
                }
            }
        }
    }

    /// Mark `block` as being given back when it has nothing in flight and
    /// nothing queued but the `queued_here` settlements about to be
    /// written (and, with `idle_since`, has been idle that long).
    fn try_give_back(
        &self,
        block: &Arc<Block>,
        queued_here: usize,
        idle_since: Option<Duration>,
    ) -> Option<GivingBack> {
        let guard = block.grow.clone().try_lock_owned().ok()?;
        let mut s = block.state();
        let idle = s.in_flight == 0
            && usize::try_from(s.pending).ok()? == queued_here
            && !s.closing
            && idle_since.is_none_or(|d| s.last_active.elapsed() >= d);
        let hold = s.hold.clone().filter(|_| idle)?;
        s.closing = true;
        Some(GivingBack {
            block: block.clone(),
            hold,
            _guard: guard,
        })
    }

    /// After a give-back: the blocks are gone (`done`) or kept.
    fn given_back(&self, give: Vec<GivingBack>, done: bool) {
        for g in give {
            let mut s = g.block.state();
            s.closing = false;
            if done && s.hold.as_ref() == Some(&g.hold) {
                s.hold = None;
                s.free = Micros::ZERO;
            }
        }
    }

    async fn renew(&self) {
        let holds: Vec<HoldId> = lock_wallets(&self.wallets)
            .values()
            .filter_map(|b| b.state().hold.clone())
            .collect();
        if let Err(e) = self.store.renew_holds(&holds).await {
            tracing::error!(error = %e, "could not renew the credit reservations' leases");
        }
    }

    /// Give back the blocks idle for [`ReserveConfig::idle`], and forget
    /// the wallets that have nothing here.
    async fn sweep(&self) {
        let blocks: Vec<Arc<Block>> = {
            let mut w = lock_wallets(&self.wallets);
            // Only the map holds such a block, so no request can be
            // admitted to it meanwhile.
            w.retain(|_, b| {
                let s = b.state();
                Arc::strong_count(b) > 1 || s.hold.is_some() || s.in_flight > 0 || s.pending > 0
            });
            w.values().cloned().collect()
        };
        // With `idle` zero this catches a block whose last settlement found
        // a growth under way, and so could not give it back.
        let give: Vec<GivingBack> = blocks
            .iter()
            .filter_map(|b| self.try_give_back(b, 0, Some(self.cfg.idle)))
            .collect();
        self.release(give).await;
    }

    async fn give_back_all(&self) {
        let blocks: Vec<Arc<Block>> = lock_wallets(&self.wallets).values().cloned().collect();
        let mut give = Vec::new();
        for block in blocks {
            let guard = block.grow.clone().lock_owned().await;
            let mut s = block.state();
            if let Some(hold) = s.hold.clone() {
                s.closing = true;
                drop(s);
                give.push(GivingBack {
                    block,
                    hold,
                    _guard: guard,
                });
            }
        }
        self.release(give).await;
    }

    async fn release(&self, give: Vec<GivingBack>) {
        if give.is_empty() {
            return;
        }
        let holds: Vec<HoldId> = give.iter().map(|g| g.hold.clone()).collect();
        match self.store.settle_blocks(&[], &holds).await {
            Ok(_) => self.given_back(give, true),
            Err(e) => {
                tracing::warn!(error = %e, "could not give back credit reservations; they lapse if this persists");
                self.given_back(give, false);
            }
        }
    }
}

/// Apply a written (or failed) settlement to its block and answer it.
fn finish(item: Item, r: Result<BlockSettled, StoreError>) {
    match &r {
        Ok(BlockSettled::Charged(_) | BlockSettled::Recorded) => {
            let mut s = item.block.state();
            s.pending = s.pending.saturating_sub(1);
        }
        Ok(BlockSettled::Debited(_) | BlockSettled::Refused) => {
            // The block's hold was found closed: it covers nothing more.
            let mut s = item.block.state();
            s.pending = s.pending.saturating_sub(1);
            if s.hold.as_ref() == Some(&item.charge.hold) {
                s.hold = None;
                s.free = Micros::ZERO;
            }
        }
        Err(_) => undo(&item),
    }
    let _ = item.reply.send(r);
}
