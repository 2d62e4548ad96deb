//! Sync plumbing (issue 12): what two-way integrations need besides moving
//! requests. Mappers translate values between a local column or fixed set
//! and another system's values (`sql/mappers.sql`); bindings link rows to
//! external objects (`sql/bindings.sql`); `syncing` keeps a sync from
//! echoing its own changes back; OAuth2 credentials keep endpoints' access
//! tokens fresh (`sql/oauth2.sql`).

pub mod bindings;
pub mod mappers;
pub mod oauth2;
pub mod syncing;
