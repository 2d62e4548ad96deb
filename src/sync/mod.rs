//! Sync plumbing (issue 12): what two-way integrations need besides moving
//! requests. Mappers translate values between a local column or fixed set
//! and another system's values (`sql/mappers.sql`).

pub mod mappers;
