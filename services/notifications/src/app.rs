//! The notifications service's use cases: send an event's email and SMS once each, file its
//! in-app item, list a customer's inbox.

use std::sync::Arc;

use sqlx::AnyConnection;

use shopverse_events::consumer::HandlerError;
use shopverse_events::envelope::Envelope;
use shopverse_kit::{Clock, ServiceError};
use shopverse_proto::notifications::v1::Notification;
use shopverse_storage::Db;

use crate::store::{self, NewItem};
use crate::{channels, templates};

#[derive(Clone)]
pub struct Notifications {
    db: Db,
    email: Option<channels::Email>,
    sms: Option<channels::Sms>,
    clock: Arc<dyn Clock>,
}

fn rendered(ev: &Envelope) -> Result<Option<templates::Rendered>, HandlerError> {
    templates::render(ev).map_err(|e| HandlerError::Permanent(e.to_string()))
}

impl Notifications {
    pub fn new(
        db: Db,
        email: Option<channels::Email>,
        sms: Option<channels::Sms>,
        clock: Arc<dyn Clock>,
    ) -> Notifications {
        Notifications {
            db,
            email,
            sms,
            clock,
        }
    }

    /// Whether any channel outside the database (email, SMS) is configured.
    pub fn sends(&self) -> bool {
        self.email.is_some() || self.sms.is_some()
    }

    async fn record(
        &self,
        ev: &Envelope,
        channel: &str,
        to: &str,
        res: &Result<(), channels::SendError>,
    ) -> Result<(), sqlx::Error> {
        let error = res.as_ref().err().map(|e| e.to_string());
        let now = self.clock.now_ms();
        store::record_send(&self.db, &ev.id, channel, to, error.as_deref(), now).await
    }

    /// Sends what `ev` says by email and SMS, each channel once per event; a failed channel
    /// makes the event retry.
    pub async fn send(&self, ev: &Envelope) -> Result<(), HandlerError> {
        let Some(r) = rendered(ev)? else {
            return Ok(());
        };
        let mut failures = Vec::new();
        let email_due =
            self.email.is_some() && !store::delivered(&self.db, &ev.id, "email").await?;
        let to = match (&r.email, email_due) {
            (_, false) => None,
            (Some(e), true) => Some(e.clone()),
            (None, true) => store::contact_email(&self.db, &r.user_id).await?,
        };
        if email_due && to.is_none() && !r.user_id.is_empty() {
            // Events of different keys run concurrently: this user's `user.registered`, which
            // tells the address, may not be applied yet. Parked and tried again, not dropped.
            failures.push(format!(
                "no email address for user {} yet (its user.registered is not applied)",
                r.user_id
            ));
        }
        if let (Some(email), Some(to)) = (&self.email, to) {
            let res = email
                .send(&to, &r.subject, &r.body, &format!("{}.email", ev.id))
                .await;
            self.record(ev, "email", &to, &res).await?;
            if let Err(e) = res {
                failures.push(e.to_string());
            }
        }
        if let Some(sms) = &self.sms
            && let Some(to) = &r.phone
            && !store::delivered(&self.db, &ev.id, "sms").await?
        {
            let res = sms.send(&format!("{}.sms", ev.id), to, &r.sms).await;
            self.record(ev, "sms", to, &res).await?;
            if let Err(e) = res {
                failures.push(e.to_string());
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(HandlerError::Retryable(failures.join("; ").into()))
        }
    }

    /// Files `ev`'s in-app item (and, from `user.registered`, the user's contact) in the
    /// consumer's transaction.
    pub async fn file(&self, conn: &mut AnyConnection, ev: &Envelope) -> Result<(), HandlerError> {
        let Some(r) = rendered(ev)? else {
            return Ok(());
        };
        if let (Some(email), Some(name)) = (&r.email, &r.display_name) {
            store::upsert_contact(conn, &r.user_id, email, name).await?;
        }
        let item = NewItem {
            user_id: &r.user_id,
            event_id: &ev.id,
            event_type: &ev.r#type,
            subject: &r.subject,
            body: &r.body,
            created_at: self.clock.now_ms(),
        };
        store::insert_item(conn, &item).await?;
        Ok(())
    }

    /// A page of `user_id`'s inbox, newest first.
    pub async fn inbox(
        &self,
        user_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Notification>, String), ServiceError> {
        let page = shopverse_kit::paging::Page::parse(page_size, page_token, 20, 100)?;
        let mut items = store::list_items(&self.db, user_id, &page.cursor, page.fetch()).await?;
        let next = page.finish(&mut items, |n| &n.id);
        Ok((items, next))
    }
}
