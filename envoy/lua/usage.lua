-- Tollway usage filter.
--
-- Request: for OpenAI streaming completions (the only requests whose usage must be asked for),
-- reads the JSON body (already buffered by json_to_metadata) with a strict JSON parser and makes
-- the provider report usage by setting stream_options.include_usage = true in the member the
-- provider's parser will keep (the last one, with key escapes decoded) -- never by
-- pattern-matching the raw bytes; refuses with 400 a body it cannot make valid, or whose
-- duplicated "model" names would let ext_authz and the provider see different models.
--
-- Response: follows the body's JSON structure as it streams past (a JSON document, or the
-- documents of an SSE stream), chunk by chunk, never holding the body, and records the token
-- counts found at the provider's usage paths (and only there: a "prompt_tokens" inside a tool
-- schema or a message is not usage) as dynamic metadata in "tollway.usage", as soon as each is
-- seen: the client may hang up right after the chunk that carried them. Envoy's decompressor
-- filters sit between the router and this filter, so the body is plain JSON here whatever
-- encoding the provider sent.
--
-- Metadata written (namespace tollway.usage): input_tokens, output_tokens, cached_input_tokens,
-- cache_creation_input_tokens, cache_creation_1h_tokens, reasoning_tokens (the provider's
-- numbers, last value wins), usage_final (the provider's final usage was seen), events (JSON
-- documents seen in the body: what an estimate of a cut-off stream uses), include_usage_added.

local find, sub, byte, char = string.find, string.sub, string.byte, string.char
local NS = "tollway.usage"
local MAX_DEPTH = 512
local LITERALS = { "true", "false", "null" }

---------------------------------------------------------------------------------------------
-- Strict JSON (RFC 8259) over a whole string: positions, validation, key decoding.
---------------------------------------------------------------------------------------------

local SIMPLE_ESCAPES = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f",
                         n = "\n", r = "\r", t = "\t" }

local function skip_ws(s, i)
  return find(s, "[^ \t\r\n]", i)
end

-- The index just past the string that opens at i, or nil and a reason.
local function string_end(s, i)
  local j = i + 1
  while true do
    local k = find(s, '["\\%z\1-\31]', j)
    if k == nil then return nil, "unterminated string" end
    local c = byte(s, k)
    if c == 34 then return k + 1 end
    if c ~= 92 then return nil, "control character in a string" end
    local e = sub(s, k + 1, k + 1)
    if e == "u" then
      if not find(s, "^%x%x%x%x", k + 2) then return nil, "bad \\u escape" end
      j = k + 6
    elseif SIMPLE_ESCAPES[e] then
      j = k + 2
    else
      return nil, "bad escape in a string"
    end
  end
end

-- A member name as a JSON parser sees it. Only ASCII names matter to this filter, so an escape
-- for any other character decodes to a byte that no name we look for contains.
local function decode_key(raw)
  if not find(raw, "\\", 1, true) then return raw end
  return (string.gsub(raw, "\\(u?)(.)(%x?%x?%x?)", function(u, c, hex)
    if u == "u" then
      local code = tonumber(c .. hex, 16)
      return (code and code < 128) and char(code) or "\255"
    end
    return (SIMPLE_ESCAPES[c] or "\255") .. hex
  end))
end

local value_end

local function number_end(s, i)
  local digits = find(s, "^%-", i) and i + 1 or i
  local _, e = find(s, "^%d+", digits)
  if e == nil then return nil, "invalid value" end
  if e > digits and byte(s, digits) == 48 then return nil, "number with a leading zero" end
  if byte(s, e + 1) == 46 then
    _, e = find(s, "^%d+", e + 2)
    if e == nil then return nil, "invalid number" end
  end
  local x = byte(s, e + 1)
  if x == 101 or x == 69 then
    _, e = find(s, "^[+-]?%d+", e + 2)
    if e == nil then return nil, "invalid number" end
  end
  return e + 1
end

-- Walks the members of the object whose '{' is at i; `each(key, key_at, value_at, value_end)`
-- sees every member. Returns the index just past the '}'.
local function object_end(s, i, depth, each)
  local j = skip_ws(s, i + 1)
  if j and byte(s, j) == 125 then return j + 1 end
  while true do
    if j == nil or byte(s, j) ~= 34 then return nil, "expected a member name" end
    local ke, err = string_end(s, j)
    if ke == nil then return nil, err end
    local colon = skip_ws(s, ke)
    if colon == nil or byte(s, colon) ~= 58 then return nil, "expected ':'" end
    local vs = skip_ws(s, colon + 1)
    if vs == nil then return nil, "unexpected end" end
    local ve
    ve, err = value_end(s, vs, depth + 1)
    if ve == nil then return nil, err end
    if each then each(decode_key(sub(s, j + 1, ke - 2)), j, vs, ve) end
    local k = skip_ws(s, ve)
    local c = k and byte(s, k)
    if c == 125 then return k + 1 end
    if c ~= 44 then return nil, "expected ',' or '}'" end
    j = skip_ws(s, k + 1)
  end
end

local function array_end(s, i, depth)
  local j = skip_ws(s, i + 1)
  if j and byte(s, j) == 93 then return j + 1 end
  while true do
    if j == nil then return nil, "unexpected end" end
    local ve, err = value_end(s, j, depth + 1)
    if ve == nil then return nil, err end
    local k = skip_ws(s, ve)
    local c = k and byte(s, k)
    if c == 93 then return k + 1 end
    if c ~= 44 then return nil, "expected ',' or ']'" end
    j = skip_ws(s, k + 1)
  end
end

value_end = function(s, i, depth)
  if depth > MAX_DEPTH then return nil, "nested too deeply" end
  local c = byte(s, i)
  if c == 123 then return object_end(s, i, depth) end
  if c == 91 then return array_end(s, i, depth) end
  if c == 34 then return string_end(s, i) end
  for _, literal in ipairs(LITERALS) do
    if sub(s, i, i + #literal - 1) == literal then return i + #literal end
  end
  return number_end(s, i)
end

-- The top-level members of a body that must be one JSON object: {key, at, value_at, value_end}.
local function members_of(body)
  local i = skip_ws(body, 1)
  if i == nil or byte(body, i) ~= 123 then return nil, "the body must be a JSON object" end
  local members = {}
  local e, err = object_end(body, i, 1, function(key, at, vs, ve)
    members[#members + 1] = { key = key, at = at, value_at = vs, value_end = ve }
  end)
  if e == nil then return nil, err end
  if skip_ws(body, e) ~= nil then return nil, "text after the JSON object" end
  return members
end

-- The member a parser keeps when a name repeats: the last one.
local function last(members, key)
  local found
  for _, m in ipairs(members) do
    if m.key == key then found = m end
  end
  return found
end

local function raw_value(body, m)
  return sub(body, m.value_at, m.value_end - 1)
end

-- The body with stream_options.include_usage true, every other member as the client wrote it;
-- nil when nothing needs changing; false and a reason when the client's stream_options is not
-- an object a provider would take.
local function with_usage_requested(body, members)
  local opts = last(members, "stream_options")
  local inner = {}
  if opts ~= nil and sub(body, opts.value_at, opts.value_at + 3) ~= "null" then
    if byte(body, opts.value_at) ~= 123 then
      return false, "stream_options must be an object"
    end
    local usage
    object_end(body, opts.value_at, 1, function(key, at, vs, ve)
      if key == "include_usage" then
        usage = sub(body, vs, ve - 1)
      else
        inner[#inner + 1] = sub(body, at, ve - 1)
      end
    end)
    if usage == "true" then return nil end
  end
  inner[#inner + 1] = '"include_usage":true'
  local out = { '{"stream_options":{' .. table.concat(inner, ",") .. "}" }
  for _, m in ipairs(members) do
    if m.key ~= "stream_options" then out[#out + 1] = sub(body, m.at, m.value_end - 1) end
  end
  return table.concat(out, ",") .. "}"
end

---------------------------------------------------------------------------------------------
-- Request
---------------------------------------------------------------------------------------------

local function refuse(handle, dialect, message)
  local body
  if dialect == "anthropic" then
    body = '{"type":"error","error":{"type":"invalid_request_error",' ..
           '"code":"invalid_request_error","message":"' .. message .. '"}}'
  else
    body = '{"error":{"message":"' .. message .. '","type":"invalid_request_error",' ..
           '"param":null,"code":"invalid_request_error"}}'
  end
  handle:streamInfo():dynamicMetadata():set(NS, "refused", "invalid_request_error")
  handle:respond({ [":status"] = "400", ["content-type"] = "application/json",
                   ["x-tollway-error"] = "invalid_request_error" }, body)
end

local function streams_usage_on_request(path)
  return find(path, "/chat/completions", 1, true) or find(path, "/completions", 1, true)
end

function envoy_on_request(request_handle)
  local authz = request_handle:streamInfo():dynamicMetadata():get("envoy.filters.http.ext_authz")
  if authz == nil or authz["dialect"] ~= "openai" or authz["stream"] ~= true then
    -- nothing to rewrite; json_to_metadata has already refused what is not JSON, and it reads
    -- duplicated and escaped names as the providers do (the last one wins)
    return
  end
  local path = request_handle:headers():get(":path") or ""
  if not streams_usage_on_request(path) then return end
  local body = request_handle:body()
  if body == nil or body:length() == 0 then return end
  local text = body:getBytes(0, body:length())
  local dialect = authz["dialect"]
  local members, err = members_of(text)
  if members == nil then
    return refuse(request_handle, dialect, "the request body is not valid JSON: " .. err)
  end
  local model = last(members, "model")
  if model == nil or byte(text, model.value_at) ~= 34
      or decode_key(sub(text, model.value_at + 1, model.value_end - 2)) ~= authz["model"] then
    -- json_to_metadata (and so ext_authz) read another "model" than the provider would
    return refuse(request_handle, dialect, "the body names more than one model")
  end
  local stream = last(members, "stream")
  if stream == nil or raw_value(text, stream) ~= "true" then return end
  local patched, why = with_usage_requested(text, members)
  if patched == false then return refuse(request_handle, dialect, why) end
  if patched == nil then return end
  body:setBytes(patched)
  request_handle:headers():replace("content-length", tostring(#patched))
  -- fetched anew: body() yielded, and Envoy invalidates handles across a yield
  request_handle:streamInfo():dynamicMetadata():set(NS, "include_usage_added", true)
end

---------------------------------------------------------------------------------------------
-- Response: an incremental scanner of JSON structure across chunks
---------------------------------------------------------------------------------------------

-- usage path (member names from the document's root) -> metadata name
local USAGE_PATHS = {}
local FINAL_PATHS = {}  -- the provider's final count: once seen, the usage is complete
do
  local fields = {
    ["usage.prompt_tokens"] = "input_tokens",                  -- OpenAI chat, completions, embeddings
    ["usage.completion_tokens"] = "output_tokens",
    ["usage.prompt_tokens_details.cached_tokens"] = "cached_input_tokens",
    ["usage.completion_tokens_details.reasoning_tokens"] = "reasoning_tokens",
    ["usage.input_tokens"] = "input_tokens",                   -- OpenAI responses, Anthropic
    ["usage.output_tokens"] = "output_tokens",
    ["usage.input_tokens_details.cached_tokens"] = "cached_input_tokens",
    ["usage.output_tokens_details.reasoning_tokens"] = "reasoning_tokens",
    ["usage.cache_read_input_tokens"] = "cached_input_tokens", -- Anthropic
    ["usage.cache_creation_input_tokens"] = "cache_creation_input_tokens",
    ["usage.cache_creation.ephemeral_1h_input_tokens"] = "cache_creation_1h_tokens",
    ["usage.total_tokens"] = "total_tokens",
  }
  -- a JSON body, or an SSE event, carries usage at its root (chat chunks, Anthropic
  -- message_delta), under "response" (Responses API events) or "message" (message_start)
  for _, prefix in ipairs({ "", "response.", "message." }) do
    for path, name in pairs(fields) do USAGE_PATHS[prefix .. path] = name end
  end
  FINAL_PATHS["usage.completion_tokens"] = true
  FINAL_PATHS["usage.output_tokens"] = true
  FINAL_PATHS["response.usage.output_tokens"] = true
  FINAL_PATHS["usage.total_tokens"] = true  -- embeddings: no output count
end
local LEAVES = {}
for path in pairs(USAGE_PATHS) do LEAVES[string.match(path, "([%w_]+)$")] = true end

local function new_scanner()
  -- stack: one frame per open container: {obj = is object, key = member being read, want_key}
  return { stack = {}, carry = "", in_string = false, escaped = false, events = 0 }
end

local function path_of(stack)
  local parts = {}
  for d = 1, #stack do
    local f = stack[d]
    parts[d] = f.obj and (f.key or "?") or "#"
  end
  return table.concat(parts, ".")
end

-- Feeds one chunk; calls found(name, value, final) for each usage number.
local function feed(st, chunk, found)
  local buf = st.carry .. chunk
  st.carry = ""
  local i, n, stack = 1, #buf, st.stack
  while i <= n do
    if st.in_string then
      if st.escaped then
        st.escaped = false
        i = i + 1
      else
        local k = find(buf, '["\\]', i)
        if k == nil then return end
        if byte(buf, k) == 92 then
          if k == n then st.escaped = true end
          i = k + 2
        else
          st.in_string = false
          i = k + 1
        end
      end
    elseif #stack == 0 then
      -- between documents (SSE field names, blank lines): wait for the next one to open
      local k = find(buf, "[{%[]", i)
      if k == nil then return end
      if byte(buf, k) == 123 then st.events = st.events + 1 end
      stack[1] = { obj = byte(buf, k) == 123, want_key = true }
      i = k + 1
    else
      local k = find(buf, "[^ \t\r\n]", i)
      if k == nil then return end
      local c, top = byte(buf, k), stack[#stack]
      if c == 34 then
        if top.obj and top.want_key then
          local e = string_end(buf, k)
          if e == nil then st.carry = sub(buf, k); return end
          top.key, top.want_key = decode_key(sub(buf, k + 1, e - 2)), false
          i = e
        else
          st.in_string = true
          i = k + 1
        end
      elseif c == 123 or c == 91 then
        stack[#stack + 1] = { obj = c == 123, want_key = true }
        i = k + 1
      elseif c == 125 or c == 93 then
        stack[#stack] = nil
        i = k + 1
      elseif c == 44 then
        top.want_key = true
        i = k + 1
      elseif c == 58 then
        i = k + 1
      else
        local e = find(buf, "[,%]} \t\r\n]", k)
        if e == nil then st.carry = sub(buf, k); return end
        if top.obj and top.key and LEAVES[top.key] then
          local path = path_of(stack)
          local name, value = USAGE_PATHS[path], tonumber(sub(buf, k, e - 1))
          if name and value then found(name, value, FINAL_PATHS[path] or false) end
        end
        i = e
      end
    end
  end
end

function envoy_on_response(response_handle)
  local st = new_scanner()
  local events = 0
  for chunk in response_handle:bodyChunks() do
    feed(st, chunk:getBytes(0, chunk:length()), function(name, value, final)
      -- fetched anew each time: Envoy invalidates metadata handles across a yield
      local md = response_handle:streamInfo():dynamicMetadata()
      md:set(NS, name, value)
      if final then md:set(NS, "usage_final", true) end
    end)
    if st.events ~= events then
      events = st.events
      response_handle:streamInfo():dynamicMetadata():set(NS, "events", events)
    end
  end
end
