// Signs a webhook request as a provider does, with that provider's official
// library from the npm registry (tests/presets/package.json pins them), for
// tests/inbound.rs. Where a library only verifies (Slack's Bolt, Shopify's
// API library), the request is signed with Node's crypto and the library
// must accept it before it is printed.
//
//   node sign.mjs '{"provider": "stripe", "secret": "...", "body": "...", "timestamp": 1700000000, "url": "..."}'
//
// Prints {"headers": {...}}, or exits non-zero.
import crypto from "node:crypto";
import { createRequire } from "node:module";
import { sign as octokitSign } from "@octokit/webhooks-methods";

const require = createRequire(import.meta.url);
const { provider, secret, body, timestamp, url, id } = JSON.parse(process.argv[2]);
const hmac = (algorithm, key, data, encoding) => crypto.createHmac(algorithm, key).update(data).digest(encoding);

async function headers() {
  switch (provider) {
    case "stripe": {
      const stripe = require("stripe")("sk_test_unused");
      return { "Stripe-Signature": stripe.webhooks.generateTestHeaderString({ payload: body, secret, timestamp }) };
    }
    case "github":
      return { "X-Hub-Signature-256": await octokitSign(secret, body), "X-GitHub-Delivery": id, "X-GitHub-Event": "push" };
    case "svix": {
      const { Webhook } = require("svix");
      const signature = new Webhook(secret).sign(id, new Date(timestamp * 1000), body);
      return { "svix-id": id, "svix-timestamp": String(timestamp), "svix-signature": signature };
    }
    case "twilio": {
      const twilio = require("twilio");
      const params = Object.fromEntries(new URLSearchParams(body));
      const signature = twilio.getExpectedTwilioSignature(secret, url, params);
      if (!twilio.validateRequest(secret, signature, url, params)) throw new Error("twilio rejects its own signature");
      return { "X-Twilio-Signature": signature, "I-Twilio-Idempotency-Token": id,
               "Content-Type": "application/x-www-form-urlencoded" };
    }
    case "slack": {
      const { verifySlackRequest } = require("@slack/bolt");
      const signature = "v0=" + hmac("sha256", secret, `v0:${timestamp}:${body}`, "hex");
      const h = { "x-slack-signature": signature, "x-slack-request-timestamp": timestamp };
      verifySlackRequest({ signingSecret: secret, body, headers: h }); // throws unless valid
      return { "X-Slack-Signature": signature, "X-Slack-Request-Timestamp": String(timestamp) };
    }
    case "shopify": {
      await import("@shopify/shopify-api/adapters/node");
      const { shopifyApi, ApiVersion } = await import("@shopify/shopify-api");
      const shopify = shopifyApi({ apiKey: "k", apiSecretKey: secret, scopes: [], hostName: "localhost",
                                   apiVersion: ApiVersion.October24, isEmbeddedApp: false, logger: { level: 0 } });
      const signature = hmac("sha256", secret, body, "base64");
      const h = { "X-Shopify-Hmac-Sha256": signature, "X-Shopify-Webhook-Id": id, "X-Shopify-Topic": "orders/create",
                  "X-Shopify-Shop-Domain": "test.myshopify.com", "X-Shopify-API-Version": "2024-10",
                  "X-Shopify-Event-Id": id, "X-Shopify-Triggered-At": new Date().toISOString(),
                  "Content-Type": "application/json" };
      const check = await shopify.webhooks.validate({ rawBody: body, rawRequest: { headers: h, method: "POST" },
                                                      rawResponse: {} });
      if (!check.valid) throw new Error("shopify rejects the request: " + JSON.stringify(check));
      return h;
    }
    default:
      throw new Error(`unknown provider ${provider}`);
  }
}

console.log(JSON.stringify({ headers: await headers() }));
