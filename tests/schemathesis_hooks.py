"""schemathesis hooks of test_openapi_contract (loaded through SCHEMATHESIS_HOOKS by the schemathesis CLI).

One check of ours: a schema-valid request may be refused (400) only for what no JSON schema can say: that the
engine cannot speak this text (unreadable_text: the offline English voice and text without Latin letters or
digits; nothing_to_speak: punctuation or symbols alone), or that the loaded model cannot do what is asked
(unsupported_mode: making or converting voices on a model without cloning). Any other 400 to schema-valid data is
a mismatch."""
from __future__ import annotations

import json

import schemathesis

BEYOND_SCHEMA = {"unreadable_text", "nothing_to_speak", "unsupported_mode"}


@schemathesis.check
def valid_data_refused_only_for_what_no_schema_says(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return
    code = json.loads(response.content)["error"]["code"]
    if code not in BEYOND_SCHEMA:
        raise AssertionError(f"schema-valid data refused with {code}, which the schema should have said")
