-- io.lua: fa.save / fa.load in the safetensors format (8-byte little-endian header length, a JSON header
-- {name: {dtype, shape, data_offsets}}, then raw little-endian data), readable by Python's safetensors.
local ffi = require 'ffi'
local T = require 'fastattn.tensor'

local M = {}

local ST_DTYPE = { float32 = 'F32', float64 = 'F64', bfloat16 = 'BF16', float16 = 'F16', int32 = 'I32', int64 = 'I64', bool = 'BOOL' }
local DTYPE_ST = {}
for k, v in pairs(ST_DTYPE) do DTYPE_ST[v] = k end

local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    local map = { ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\t'] = '\\t', ['\r'] = '\\r' }
    return map[c] or string.format('\\u%04x', c:byte())
  end) .. '"'
end

-- a small JSON reader, enough for safetensors headers (objects, arrays, strings, numbers)
local function json_decode(s)
  local pos = 1
  local function ws() pos = s:find('[^ \t\r\n]', pos) or #s + 1 end
  local value
  local function str()
    local out, i = {}, pos + 1
    while true do
      local c = s:sub(i, i)
      if c == '"' then pos = i + 1; return table.concat(out) end
      if c == '' then error('fa.load: unterminated string in the header', 0) end
      if c == '\\' then
        local e = s:sub(i + 1, i + 1)
        local map = { n = '\n', t = '\t', r = '\r', b = '\b', f = '\f', ['/'] = '/', ['\\'] = '\\', ['"'] = '"' }
        if e == 'u' then
          local cp = tonumber(s:sub(i + 2, i + 5), 16)
          out[#out + 1] = cp < 128 and string.char(cp) or '?'
          i = i + 6
        else out[#out + 1] = map[e]; i = i + 2 end
      else out[#out + 1] = c; i = i + 1 end
    end
  end
  function value()
    ws()
    local c = s:sub(pos, pos)
    if c == '{' then
      local t = {}
      pos = pos + 1; ws()
      if s:sub(pos, pos) == '}' then pos = pos + 1; return t end
      while true do
        ws()
        local k = str()
        ws(); assert(s:sub(pos, pos) == ':', 'fa.load: bad header JSON'); pos = pos + 1
        t[k] = value()
        ws()
        local d = s:sub(pos, pos); pos = pos + 1
        if d == '}' then return t end
        if d ~= ',' then error('fa.load: bad header JSON at byte ' .. pos, 0) end
      end
    elseif c == '[' then
      local t = {}
      pos = pos + 1; ws()
      if s:sub(pos, pos) == ']' then pos = pos + 1; return t end
      while true do
        t[#t + 1] = value()
        ws()
        local d = s:sub(pos, pos); pos = pos + 1
        if d == ']' then return t end
        if d ~= ',' then error('fa.load: bad header JSON at byte ' .. pos, 0) end
      end
    elseif c == '"' then return str()
    else
      local num = s:match('^-?[%d.eE+-]+', pos)
      if num then pos = pos + #num; return tonumber(num) end
      for lit, v in pairs({ ['true'] = true, ['false'] = false, ['null'] = false }) do
        if s:sub(pos, pos + #lit - 1) == lit then pos = pos + #lit; return v end
      end
      error('fa.load: bad header JSON at byte ' .. pos, 0)
    end
  end
  return value()
end
M._json_decode = json_decode

-- fa.save(path, {name = tensor, ...}, [metadata table of strings])
function M.save(path, tbl, metadata)
  if type(tbl) ~= 'table' then error('fa.save: argument 2: expected a table of tensors, got ' .. type(tbl), 2) end
  local names = {}
  for k, v in pairs(tbl) do
    if not T.isTensor(v) then error('fa.save: entry ' .. tostring(k) .. ' is not a tensor', 2) end
    names[#names + 1] = tostring(k)
  end
  table.sort(names)
  local parts, blobs, off = {}, {}, 0
  if metadata then
    local m = {}
    for k, v in pairs(metadata) do m[#m + 1] = json_string(tostring(k)) .. ':' .. json_string(tostring(v)) end
    table.sort(m)
    parts[#parts + 1] = '"__metadata__":{' .. table.concat(m, ',') .. '}'
  end
  for _, k in ipairs(names) do
    local x = tbl[k]:to('cpu'):contiguous()
    local nbytes = x:numel() * ffi.sizeof('char') * require('fastattn.ffi').fa_dtype_size(x.desc.dtype)
    parts[#parts + 1] = string.format('%s:{"dtype":"%s","shape":[%s],"data_offsets":[%d,%d]}', json_string(k),
      ST_DTYPE[x:dtype()], table.concat(x:size(), ','), off, off + nbytes)
    blobs[#blobs + 1] = ffi.string(x.desc.data, nbytes)
    off = off + nbytes
  end
  local header = '{' .. table.concat(parts, ',') .. '}'
  header = header .. string.rep(' ', (8 - #header % 8) % 8)
  local f, err = io.open(path, 'wb')
  if not f then error('fa.save: cannot open ' .. path .. ': ' .. tostring(err), 2) end
  local len = ffi.new('uint64_t[1]', #header)
  f:write(ffi.string(len, 8), header)
  for _, b in ipairs(blobs) do f:write(b) end
  f:close()
end

-- fa.load(path) -> {name = tensor}, metadata
function M.load(path)
  local f, err = io.open(path, 'rb')
  if not f then error('fa.load: cannot open ' .. path .. ': ' .. tostring(err), 2) end
  local data = f:read('*a')
  f:close()
  if #data < 8 then error('fa.load: ' .. path .. ' is not a safetensors file (shorter than 8 bytes)', 2) end
  local len = tonumber(ffi.cast('const uint64_t*', data)[0])
  if len > #data - 8 then error('fa.load: ' .. path .. ': header length ' .. len .. ' exceeds the file size', 2) end
  local header = json_decode(data:sub(9, 8 + len))
  local base = 8 + len
  local out, meta = {}, nil
  for k, v in pairs(header) do
    if k == '__metadata__' then meta = v
    else
      local dt = DTYPE_ST[v.dtype]
      if not dt then error('fa.load: ' .. path .. ': tensor ' .. k .. ' has unsupported dtype ' .. tostring(v.dtype), 2) end
      local x = T.empty(v.shape, dt)
      local a, b = v.data_offsets[1], v.data_offsets[2]
      if b - a ~= x:numel() * require('fastattn.ffi').fa_dtype_size(x.desc.dtype) or base + b > #data then
        error('fa.load: ' .. path .. ': tensor ' .. k .. ' has inconsistent data offsets', 2)
      end
      ffi.copy(x.desc.data, ffi.cast('const char*', data) + base + a, b - a)
      out[k] = x
    end
  end
  return out, meta
end

return M
