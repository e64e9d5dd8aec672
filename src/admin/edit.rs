//! The API's edits of a config: `PUT` replaces it whole, `PATCH` lays a JSON merge patch over
//! it. Both hold the org's row while they read and write it
//! ([`Store::edit_provider_config`](crate::store::Store::edit_provider_config)), and both name
//! the field of every problem.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{AdminState, ConfigView, FieldProblem, error, input, not_found, patch, unavailable};
use crate::crypto::KeyRing;
use crate::store::StoreError;
use crate::store::configs::Edited;

/// The refusal of a request whose body is not said to be JSON (or, for a patch, a JSON merge
/// patch); none when it is.
fn refuse_unless_json(headers: &HeaderMap, merge_patch: bool) -> Option<Response> {
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let accepted = media.starts_with("application/json")
        || (merge_patch && media.starts_with("application/merge-patch+json"));
    if accepted {
        return None;
    }
    let message = if merge_patch {
        "send application/merge-patch+json (or application/json)"
    } else {
        "send application/json"
    };
    Some(error(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        message,
        None,
    ))
}

/// Why an edit was not stored.
enum Refused {
    NoConfig,
    Body(FieldProblem),
    Config(Vec<FieldProblem>),
}

/// The answer to an edit: the stored config (201 when it is new), or what stood in the way.
fn edit_response(
    org: &str,
    keys: &KeyRing,
    edited: Result<Result<Edited, Refused>, StoreError>,
) -> Response {
    match edited {
        Ok(Ok(edited)) => {
            let status = if edited.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, axum::Json(ConfigView::new(&edited.config, keys))).into_response()
        }
        Ok(Err(Refused::NoConfig)) => not_found(org),
        Ok(Err(Refused::Body(problem))) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            &problem.to_string(),
            Some(&[problem]),
        ),
        Ok(Err(Refused::Config(problems))) => {
            let message = problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_config",
                &message,
                Some(&problems),
            )
        }
        Err(err) => unavailable(err),
    }
}

/// Creates or replaces a config: what the body leaves out takes its default.
pub(super) async fn put_config(
    State(state): State<Arc<AdminState>>,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refuse_unless_json(&headers, false) {
        return refused;
    }
    let input = match input::read(&mut serde_json::Deserializer::from_slice(&body)) {
        Ok(input) => input,
        Err(problem) => return edit_response(&org, &state.keys, Ok(Err(Refused::Body(problem)))),
    };
    let edited = state
        .store
        .edit_provider_config(&org, |stored| {
            input
                .into_config(&org, stored, &state.keys, state.policy)
                .map_err(Refused::Config)
        })
        .await;
    edit_response(&org, &state.keys, edited)
}

/// Changes some settings of a stored config: the body is a JSON merge patch (RFC 7396) of
/// the config as PUT takes it; what it leaves out stays, `null` takes a setting back to its
/// default.
pub(super) async fn patch_config(
    State(state): State<Arc<AdminState>>,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refuse_unless_json(&headers, true) {
        return refused;
    }
    let patch: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(patch) => patch,
        Err(err) => {
            let problem = FieldProblem::new("body", input::redact_serde_message(&err.to_string()));
            return edit_response(&org, &state.keys, Ok(Err(Refused::Body(problem))));
        }
    };
    let edited = state
        .store
        .edit_provider_config(&org, |stored| {
            let stored = stored.ok_or(Refused::NoConfig)?;
            let input = patch::patched(stored, patch).map_err(Refused::Body)?;
            input
                .into_config(&org, Some(stored), &state.keys, state.policy)
                .map_err(Refused::Config)
        })
        .await;
    edit_response(&org, &state.keys, edited)
}
