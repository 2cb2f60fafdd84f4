-- Tollway usage filter: reads the provider's token usage from the response body as it streams
-- past (JSON or SSE), chunk by chunk, never holding the whole body, and records it as dynamic
-- metadata in the "tollway.usage" namespace for the access log (and so for costsink).
--
-- A usage block may be split across two chunks, so each scan covers the tail of the previous
-- chunk plus the current one. The last value seen wins: Anthropic streams report output tokens
-- again in message_delta, and an OpenAI stream carries usage only in its final chunk.
--
-- For OpenAI streaming requests it also sets stream_options.include_usage when the client did
-- not, so the provider reports usage at all; that usage-only chunk is passed on unchanged.

local TAIL = 512
local FIELDS = {
  prompt_tokens = "input_tokens",           -- OpenAI chat/completions/embeddings
  completion_tokens = "output_tokens",
  cached_tokens = "cached_input_tokens",    -- OpenAI prompt_tokens_details / input_tokens_details
  input_tokens = "input_tokens",            -- OpenAI responses, Anthropic messages
  output_tokens = "output_tokens",
  cache_read_input_tokens = "cached_input_tokens",
  cache_creation_input_tokens = "cache_creation_input_tokens",
}

-- Records every usage field found in `text` at once: the client may hang up (and Envoy end
-- the stream) right after the chunk that carried the usage, before the body loop completes.
-- The metadata object is fetched anew on each call: Envoy invalidates handles across a yield.
local function scan(text, response_handle)
  for field, name in pairs(FIELDS) do
    local last = nil
    for value in string.gmatch(text, '"' .. field .. '"%s*:%s*(%d+)') do
      last = tonumber(value)
    end
    if last ~= nil then
      response_handle:streamInfo():dynamicMetadata():set("tollway.usage", name, last)
    end
  end
end

function envoy_on_request(request_handle)
  local req = request_handle:streamInfo():dynamicMetadata():get("tollway.request")
  local authz = request_handle:streamInfo():dynamicMetadata():get("envoy.filters.http.ext_authz")
  if req == nil or authz == nil or req["stream"] ~= true or authz["dialect"] ~= "openai" then
    return
  end
  local path = request_handle:headers():get(":path") or ""
  if not (string.find(path, "/chat/completions", 1, true) or string.find(path, "/completions", 1, true)) then
    return
  end
  local body = request_handle:body()  -- already buffered by json_to_metadata
  if body == nil then return end
  local text = body:getBytes(0, body:length())
  local patched
  if string.find(text, '"include_usage"%s*:%s*true') then
    return
  elseif string.find(text, '"include_usage"%s*:%s*false') then
    patched = string.gsub(text, '"include_usage"%s*:%s*false', '"include_usage":true', 1)
  elseif string.find(text, '"stream_options"%s*:%s*{') then
    patched = string.gsub(text, '("stream_options"%s*:%s*{)', '%1"include_usage":true,', 1)
    patched = string.gsub(patched, '"include_usage":true,%s*}', '"include_usage":true}', 1)
  else
    patched = string.gsub(text, "^%s*{", '{"stream_options":{"include_usage":true},', 1)
  end
  body:setBytes(patched)
  request_handle:headers():replace("content-length", tostring(string.len(patched)))
  request_handle:streamInfo():dynamicMetadata():set("tollway.usage", "include_usage_added", true)
end

function envoy_on_response(response_handle)
  local tail = ""
  for chunk in response_handle:bodyChunks() do
    local joined = tail .. chunk:getBytes(0, chunk:length())
    scan(joined, response_handle)
    tail = string.sub(joined, -TAIL)
  end
end
