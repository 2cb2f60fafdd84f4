"""The dynamic-metadata namespaces that carry a request's facts from filter to filter.

They are the contract between the rendered Envoy config, the services and the access log:
json_to_metadata writes REQUEST, ext_authz answers into AUTHZ, the rate limiter into RATELIMIT,
the Lua filter (envoy/lua/usage.lua, which spells its namespace itself) into USAGE.
"""

REQUEST = "tollway.request"  # model, stream, max_tokens, body_error: from the request body
AUTHZ = "envoy.filters.http.ext_authz"  # identity, model, route, reserve_tokens
RATELIMIT = "envoy.filters.http.ratelimit"  # reserved_tokens, charged_at_ms, denied_quota
USAGE = "tollway.usage"  # the provider's reported token usage
