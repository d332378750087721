-- io.lua: fa.save / fa.load in the safetensors format (8-byte little-endian header length, a JSON header
-- {name: {dtype, shape, data_offsets}, "__metadata__": {string: string}}, then raw little-endian data),
-- readable by Python's safetensors. The reader is at least as strict as the reference implementation
-- (huggingface/safetensors, tensor.rs): every check runs before a tensor is allocated. The writer is atomic:
-- a temporary file in the target's directory, fsync'ed, renamed over the target.
-- Linux/glibc only (statx, fsync, rename through the FFI), like the rest of the library.
local ffi = require 'ffi'
local bit = require 'bit'
local T = require 'fastattn.tensor'
local E = require 'fastattn.errors'

local registry = debug.getregistry()
if not registry.fastattn_io_cdef then
  -- symbol names through __asm__ so that no other module's declaration of open/fsync/... can clash
  ffi.cdef [[
typedef struct fa_io_stat {            /* struct statx: one layout on every architecture */
  uint32_t mask, blksize; uint64_t attributes; uint32_t nlink, uid, gid; uint16_t mode, spare0;
  uint64_t ino, size, blocks; uint8_t rest[200];
} fa_io_stat;
typedef struct fa_io_FILE fa_io_FILE;
int fa_io_statx(int dirfd, const char *path, int flags, unsigned mask, fa_io_stat *st) __asm__("statx");
fa_io_FILE *fa_io_fopen(const char *path, const char *mode) __asm__("fopen");
size_t fa_io_fread(void *p, size_t size, size_t n, fa_io_FILE *f) __asm__("fread");
size_t fa_io_fwrite(const void *p, size_t size, size_t n, fa_io_FILE *f) __asm__("fwrite");
int fa_io_fflush(fa_io_FILE *f) __asm__("fflush");
int fa_io_fclose(fa_io_FILE *f) __asm__("fclose");
int fa_io_ferror(fa_io_FILE *f) __asm__("ferror");
int fa_io_fileno(fa_io_FILE *f) __asm__("fileno");
int fa_io_fsync(int fd) __asm__("fsync");
int fa_io_fchmod(int fd, unsigned mode) __asm__("fchmod");
int fa_io_open(const char *path, int flags) __asm__("open");
int fa_io_close(int fd) __asm__("close");
int fa_io_rename(const char *from, const char *to) __asm__("rename");
int fa_io_unlink(const char *path) __asm__("unlink");
char *fa_io_strerror(int errnum) __asm__("strerror");
char *fa_io_realpath(const char *path, char *resolved) __asm__("realpath");
void fa_io_free(void *p) __asm__("free");
int fa_io_getpid(void) __asm__("getpid");
]]
  registry.fastattn_io_cdef = true
end
local C = ffi.C

local AT_FDCWD, STATX_TYPE, STATX_MODE, STATX_SIZE = -100, 0x1, 0x2, 0x200
local S_IFMT, S_IFDIR, S_IFREG = 0xF000, 0x4000, 0x8000
local MAX_HEADER = 100000000 -- the reference implementation's limit (MAX_HEADER_SIZE)
local MAX_DIMS = 8           -- fa_tensor's shape[8]

local M = {}

-- safetensors dtype <-> fastattn dtype name, element size
local ST_DTYPE = { float32 = 'F32', float64 = 'F64', bfloat16 = 'BF16', float16 = 'F16', int32 = 'I32',
                   int64 = 'I64', bool = 'BOOL' }
local DTYPE_ST = {}
for k, v in pairs(ST_DTYPE) do DTYPE_ST[v] = k end
local ST_SIZE = { F32 = 4, F64 = 8, BF16 = 2, F16 = 2, I32 = 4, I64 = 8, BOOL = 1 }
local ST_KNOWN = 'F32, F64, BF16, F16, I32, I64, BOOL'
-- safetensors dtypes without a fastattn tensor type: refused rather than converted, since a silent
-- conversion would change the dtype on a round trip (and U64 does not fit I64, nor FP8 any rounding-free type)
local ST_REFUSED = { U8 = true, I8 = true, I16 = true, U16 = true, U32 = true, U64 = true, F8_E5M2 = true,
                     F8_E4M3 = true, F8_E8M0 = true, F4 = true, F6_E2M3 = true, F6_E3M2 = true, C64 = true }

local function errtext(errno) return ffi.string(C.fa_io_strerror(errno or ffi.errno())) end

-- a name as it appears in a message: quoted, control bytes escaped
local function q(s)
  return "'" .. s:gsub('[%z\1-\31\127]', function(c) return string.format('\\x%02x', c:byte()) end) .. "'"
end

---------------------------------------------------------------------------- UTF-8
-- index after the well-formed UTF-8 sequence starting at s[i] (a byte >= 0x80), or nil (RFC 3629: no
-- overlong forms, no surrogates, nothing above U+10FFFF)
local function utf8_next(s, i)
  local c = s:byte(i)
  local n, lo, hi
  if c >= 0xC2 and c <= 0xDF then n = 1
  elseif c == 0xE0 then n, lo = 2, 0xA0
  elseif c == 0xED then n, hi = 2, 0x9F
  elseif c >= 0xE1 and c <= 0xEF then n = 2
  elseif c == 0xF0 then n, lo = 3, 0x90
  elseif c >= 0xF1 and c <= 0xF3 then n = 3
  elseif c == 0xF4 then n, hi = 3, 0x8F
  else return nil end
  for k = 1, n do
    local b = s:byte(i + k)
    if not b or b < (k == 1 and lo or 0x80) or b > (k == 1 and hi or 0xBF) then return nil end
  end
  return i + n + 1
end

local function utf8_valid(s)
  local i = s:find('[\128-\255]')
  while i do
    i = utf8_next(s, i)
    if not i then return false end
    i = s:find('[\128-\255]', i)
  end
  return true
end

local function utf8_encode(cp)
  if cp < 0x80 then return string.char(cp) end
  if cp < 0x800 then return string.char(0xC0 + bit.rshift(cp, 6), 0x80 + bit.band(cp, 0x3F)) end
  if cp < 0x10000 then
    return string.char(0xE0 + bit.rshift(cp, 12), 0x80 + bit.band(bit.rshift(cp, 6), 0x3F), 0x80 + bit.band(cp, 0x3F))
  end
  return string.char(0xF0 + bit.rshift(cp, 18), 0x80 + bit.band(bit.rshift(cp, 12), 0x3F),
                     0x80 + bit.band(bit.rshift(cp, 6), 0x3F), 0x80 + bit.band(cp, 0x3F))
end

---------------------------------------------------------------------------- strict JSON (RFC 8259)
-- Values: strings as Lua strings; true/false as booleans; null as NULL; numbers as {kind='number', text=...}
-- (the text as written, so that integer checks see 2.0 and 1e3); arrays {kind='array', n, [1..n]};
-- objects {kind='object', keys = {in order}, map = {}}. Duplicate keys are errors.
local NULL = { kind = 'null' }
local ESC = { [34] = '"', [92] = '\\', [47] = '/', [98] = '\b', [102] = '\f', [110] = '\n', [114] = '\r',
              [116] = '\t' }
local MAX_DEPTH = 32

-- bad(fmt, ...) raises; positions are 0-based byte offsets into the header
local function json_decode(s, bad)
  local pos, len = 1, #s
  local function fail(msg, at) bad('the header is not valid JSON: %s at byte %d of the header', msg, (at or pos) - 1) end
  local function ws() pos = s:find('[^ \t\n\r]', pos) or len + 1 end

  local function str()
    local out, n, i = {}, 0, pos + 1
    while true do
      local j = s:find('[%z\1-\31"\\\128-\255]', i)
      if not j then fail('unterminated string', pos) end
      if j > i then n = n + 1; out[n] = s:sub(i, j - 1) end
      local c = s:byte(j)
      if c == 34 then
        pos = j + 1
        return table.concat(out, '', 1, n)
      elseif c == 92 then
        local e = s:byte(j + 1)
        if e == 117 then -- \uXXXX, surrogate pairs combined
          local hex = s:match('^%x%x%x%x', j + 2)
          if not hex then fail('bad \\u escape (expected 4 hex digits)', j) end
          local cp = tonumber(hex, 16)
          i = j + 6
          if cp >= 0xD800 and cp <= 0xDBFF then
            local lo = s:match('^\\u(%x%x%x%x)', i)
            lo = lo and tonumber(lo, 16)
            if not lo or lo < 0xDC00 or lo > 0xDFFF then fail('lone surrogate \\u' .. hex, j) end
            cp = 0x10000 + (cp - 0xD800) * 0x400 + (lo - 0xDC00)
            i = i + 6
          elseif cp >= 0xDC00 and cp <= 0xDFFF then
            fail('lone surrogate \\u' .. hex, j)
          end
          n = n + 1; out[n] = utf8_encode(cp)
        else
          if not ESC[e] then fail('bad escape \\' .. (e and string.char(e) or ''), j) end
          n = n + 1; out[n] = ESC[e]
          i = j + 2
        end
      elseif c < 32 then
        fail(string.format('unescaped control character 0x%02x in a string', c), j)
      else
        local k = utf8_next(s, j)
        if not k then fail('invalid UTF-8', j) end
        n = n + 1; out[n] = s:sub(j, k - 1)
        i = k
      end
    end
  end

  local function number()
    local _, e = s:find('^-?0', pos)
    if not e then _, e = s:find('^-?[1-9]%d*', pos) end
    if not e then fail('unexpected character ' .. q(s:sub(pos, pos))) end
    local _, f = s:find('^%.%d+', e + 1)
    e = f or e
    _, f = s:find('^[eE][+-]?%d+', e + 1)
    e = f or e
    local text = s:sub(pos, e)
    pos = e + 1
    return { kind = 'number', text = text }
  end

  local value
  function value(depth)
    if depth > MAX_DEPTH then fail('nested more than ' .. MAX_DEPTH .. ' deep') end
    ws()
    local c = s:byte(pos)
    if c == 123 then -- {
      local obj = { kind = 'object', keys = {}, map = {} }
      pos = pos + 1; ws()
      if s:byte(pos) == 125 then pos = pos + 1; return obj end
      while true do
        if s:byte(pos) ~= 34 then fail('expected a string key') end
        local kpos = pos
        local k = str()
        ws()
        if s:byte(pos) ~= 58 then fail("expected ':'") end
        pos = pos + 1
        if obj.map[k] ~= nil then fail('duplicate key ' .. q(k), kpos) end
        obj.map[k] = value(depth + 1)
        obj.keys[#obj.keys + 1] = k
        ws()
        c = s:byte(pos)
        if c == 125 then pos = pos + 1; return obj end
        if c ~= 44 then fail("expected ',' or '}'") end
        pos = pos + 1; ws()
      end
    elseif c == 91 then -- [
      local arr = { kind = 'array', n = 0 }
      pos = pos + 1; ws()
      if s:byte(pos) == 93 then pos = pos + 1; return arr end
      while true do
        arr.n = arr.n + 1
        arr[arr.n] = value(depth + 1)
        ws()
        c = s:byte(pos)
        if c == 93 then pos = pos + 1; return arr end
        if c ~= 44 then fail("expected ',' or ']'") end
        pos = pos + 1
      end
    elseif c == 34 then return str()
    elseif c == nil then fail('unexpected end')
    elseif s:sub(pos, pos + 3) == 'true' then pos = pos + 4; return true
    elseif s:sub(pos, pos + 4) == 'false' then pos = pos + 5; return false
    elseif s:sub(pos, pos + 3) == 'null' then pos = pos + 4; return NULL
    else return number() end
  end

  local v = value(1)
  ws()
  if pos <= len then fail('trailing characters after the JSON value') end
  return v
end

-- a JSON value as it appears in a message
local function show(v)
  if type(v) == 'string' then return '"' .. q(#v > 40 and v:sub(1, 37) .. '...' or v):sub(2, -2) .. '"' end
  if type(v) == 'boolean' then return tostring(v) end
  if v.kind == 'null' then return 'null' end
  if v.kind == 'number' then return v.text end
  if v.kind == 'object' then return 'an object' end
  local parts = {}
  for i = 1, math.min(v.n, 10) do parts[i] = show(v[i]) end
  if v.n > 10 then parts[11] = '...' end
  return '[' .. table.concat(parts, ', ') .. ']'
end
local function kind(v)
  if type(v) == 'string' then return 'a string' end
  if type(v) == 'boolean' then return 'a boolean' end
  return ({ null = 'null', number = 'a number', object = 'an object', array = 'an array' })[v.kind]
end

-- a JSON number written as a non-negative integer below 2^53: the value, or nil and why not
local function json_uint(v)
  if type(v) ~= 'table' or v.kind ~= 'number' then return nil, 'is ' .. kind(v) .. ', expected an integer' end
  if not v.text:match('^%-?%d+$') then return nil, 'is not an integer' end
  if v.text:sub(1, 1) == '-' then return nil, 'is negative' end
  local x = tonumber(v.text)
  if #v.text > 16 or x >= 2 ^ 53 then return nil, 'is too large' end
  return x
end

---------------------------------------------------------------------------- fa.load
-- fread exactly n bytes into ptr, or raise (read error with errno text, or the file ended early)
local function read_exact(f, ptr, n, bad, what)
  if n == 0 then return end
  local got = tonumber(C.fa_io_fread(ptr, 1, n, f))
  if got ~= n then
    if C.fa_io_ferror(f) ~= 0 then bad('cannot read %s: %s', what, errtext()) end
    bad('the file ended while reading %s (%d of %d bytes read): it changed while being read?', what, got, n)
  end
end

-- checks one header entry; returns {name, dtype, shape, b, e, nbytes}
local function check_entry(name, v, bad)
  local function badt(fmt, ...) bad('tensor %s: ' .. fmt, q(name), ...) end
  if type(v) ~= 'table' or v.kind ~= 'object' then
    badt('expected an object {"dtype", "shape", "data_offsets"}, got %s', kind(v))
  end
  for _, k in ipairs(v.keys) do
    if k ~= 'dtype' and k ~= 'shape' and k ~= 'data_offsets' then
      badt('unknown key %s (expected "dtype", "shape", "data_offsets")', q(k))
    end
  end
  local dt, shape, offs = v.map.dtype, v.map.shape, v.map.data_offsets
  if dt == nil then badt('missing "dtype"') end
  if shape == nil then badt('missing "shape"') end
  if offs == nil then badt('missing "data_offsets"') end
  if type(dt) ~= 'string' then badt('dtype: expected a string, got %s', show(dt)) end
  if not DTYPE_ST[dt] then
    if ST_REFUSED[dt] then
      badt("dtype %s: fastattn has no tensor type for it (it reads %s); convert it before saving", q(dt), ST_KNOWN)
    end
    badt('unknown dtype %s (expected one of %s)', q(dt), ST_KNOWN)
  end
  if type(shape) ~= 'table' or shape.kind ~= 'array' then badt('shape: expected an array of sizes, got %s', show(shape)) end
  if shape.n > MAX_DIMS then badt('shape %s: %d dimensions, at most %d', show(shape), shape.n, MAX_DIMS) end
  -- numel with the non-zero sizes alone kept below 2^53 (the strides of an empty tensor must fit too)
  local sizes, numel, product = {}, 1, 1
  for i = 1, shape.n do
    local x, why = json_uint(shape[i])
    if not x then badt('shape %s: size %d %s, expected a non-negative integer', show(shape), i, why) end
    sizes[i] = x
    numel = numel * x
    product = product * math.max(x, 1)
    if product >= 2 ^ 53 then badt('shape %s: too many elements', show(shape)) end
  end
  if type(offs) ~= 'table' or offs.kind ~= 'array' or offs.n ~= 2 then
    badt('data_offsets: expected [begin, end], got %s', show(offs))
  end
  local b, why = json_uint(offs[1])
  if not b then badt('data_offsets %s: begin %s, expected a non-negative integer', show(offs), why) end
  local e, why2 = json_uint(offs[2])
  if not e then badt('data_offsets %s: end %s, expected a non-negative integer', show(offs), why2) end
  if b > e then badt('data_offsets %s: begin is past end', show(offs)) end
  local nbytes = numel * ST_SIZE[dt]
  if e - b ~= nbytes then
    badt('data_offsets %s hold %d bytes, but shape %s of %s needs %.0f', show(offs), e - b, show(shape), dt, nbytes)
  end
  return { name = name, dtype = DTYPE_ST[dt], shape = sizes, b = b, e = e, nbytes = nbytes }
end

local function check_metadata(v, bad)
  if type(v) ~= 'table' or v.kind ~= 'object' then
    bad('"__metadata__": expected an object of strings, got %s', kind(v))
  end
  local meta = {}
  for _, k in ipairs(v.keys) do
    if type(v.map[k]) ~= 'string' then
      bad('"__metadata__": the value of %s is %s, expected a string', q(k), kind(v.map[k]))
    end
    meta[k] = v.map[k]
  end
  return meta
end

local function read_file(f, path, size, bad)
  if size < 8 then bad('not a safetensors file: %d bytes, shorter than the 8-byte header length', size) end
  local b8 = ffi.new('uint8_t[8]')
  read_exact(f, b8, 8, bad, 'the header length')
  local n64 = ffi.new('uint64_t', 0)
  for i = 7, 0, -1 do n64 = n64 * 256 + b8[i] end
  local nstr = tostring(n64):gsub('ULL$', '')
  if n64 > MAX_HEADER then
    bad('header length %s is larger than the safetensors limit of %d bytes (not a safetensors file?)', nstr, MAX_HEADER)
  end
  local n = tonumber(n64)
  if 8 + n > size then bad('header length %d runs past the end of the file (%d bytes)', n, size) end
  local hbuf = ffi.new('char[?]', math.max(n, 1))
  read_exact(f, hbuf, n, bad, 'the header')
  local header = ffi.string(hbuf, n)
  hbuf = nil
  local doc = json_decode(header, bad)
  if type(doc) ~= 'table' or doc.kind ~= 'object' then bad('the header is %s, expected a JSON object', kind(doc)) end

  local entries, meta = {}, nil
  for _, name in ipairs(doc.keys) do
    if name == '__metadata__' then meta = check_metadata(doc.map[name], bad)
    else entries[#entries + 1] = check_entry(name, doc.map[name], bad) end
  end
  -- the data section: offsets sorted by begin must tile it exactly (no gap, no overlap, nothing left over)
  local dsize = size - 8 - n
  for _, t in ipairs(entries) do
    if t.e > dsize then
      bad('tensor %s: data_offsets [%d, %d] run past the end of the data section (%d bytes)', q(t.name), t.b, t.e, dsize)
    end
  end
  table.sort(entries, function(x, y)
    if x.b ~= y.b then return x.b < y.b end
    if x.e ~= y.e then return x.e < y.e end
    return x.name < y.name
  end)
  local at, prev = 0, nil
  for _, t in ipairs(entries) do
    if t.b > at then
      bad('tensor %s: data_offsets [%d, %d] leave bytes [%d, %d) of the data section unused', q(t.name), t.b, t.e, at, t.b)
    elseif t.b < at then
      bad('tensor %s: data_offsets [%d, %d] overlap tensor %s at [%d, %d]', q(t.name), t.b, t.e, q(prev.name),
          prev.b, prev.e)
    end
    at, prev = t.e, t
  end
  if at ~= dsize then
    if prev then
      bad('tensor %s: data_offsets [%d, %d] end the data, but %d more bytes follow in the file', q(prev.name),
          prev.b, prev.e, dsize - at)
    end
    bad('no tensors in the header, but %d bytes of data follow it', dsize)
  end

  -- every check passed: allocate and read, in file order (the data is contiguous)
  local out = {}
  for _, t in ipairs(entries) do
    local ok, x = pcall(T.empty, t.shape, t.dtype)
    if not ok then bad('tensor %s: cannot allocate %d bytes', q(t.name), t.nbytes) end
    read_exact(f, x.desc.data, t.nbytes, bad, 'tensor ' .. q(t.name))
    out[t.name] = x
  end
  return out, meta
end

-- fa.load(path) -> {name = tensor}, metadata (a table of strings, or nil)
function M.load(path)
  if type(path) ~= 'string' or path:find('%z') then E.argv('fa.load', 'path', 'a string without NUL bytes', path) end
  local where = 'fa.load: ' .. q(path) .. ': '
  local function bad(fmt, ...) E.raise(where .. string.format(fmt, ...)) end
  local st = ffi.new('fa_io_stat')
  if C.fa_io_statx(AT_FDCWD, path, 0, STATX_TYPE + STATX_SIZE, st) ~= 0 then bad('cannot open: %s', errtext()) end
  local mode = bit.band(st.mode, S_IFMT)
  if mode == S_IFDIR then bad('is a directory, not a safetensors file') end
  if mode ~= S_IFREG then bad('is not a regular file') end
  local f = C.fa_io_fopen(path, 'rb')
  if f == nil then bad('cannot open: %s', errtext()) end
  local ok, out, meta = pcall(read_file, f, path, tonumber(st.size), bad)
  C.fa_io_fclose(f)
  if not ok then error(out, 0) end
  return out, meta
end

---------------------------------------------------------------------------- fa.save
local function json_string(s)
  return '"' .. s:gsub('[%z\1-\31"\\]', function(c)
    local map = { ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\t'] = '\\t', ['\r'] = '\\r' }
    return map[c] or string.format('\\u%04x', c:byte())
  end) .. '"'
end

local tmp_counter = 0

-- fa.save(path, {name = tensor, ...}, [metadata: a table of string -> string])
function M.save(path, tbl, metadata)
  local FN = 'fa.save'
  -- a NUL would cut the path short in C: 'a.st\0x' must not write 'a.st'
  if type(path) ~= 'string' or path == '' or path:find('%z') then
    E.argv(FN, 'path', 'a non-empty string without NUL bytes', path)
  end
  if type(tbl) ~= 'table' then E.argv(FN, 'tensors', 'a table of name -> tensor', tbl) end
  local function bad_arg(arg, fmt, ...) E.raise(string.format("%s: argument '%s': ", FN, arg) .. string.format(fmt, ...)) end
  local names = {}
  for k, v in pairs(tbl) do
    if type(k) ~= 'string' or k == '' then bad_arg('tensors', 'names must be non-empty strings, got %s', E.describe(k)) end
    if k == '__metadata__' then bad_arg('tensors', "'__metadata__' cannot name a tensor (safetensors keeps it for the metadata)") end
    if not utf8_valid(k) then bad_arg('tensors', 'name %s is not valid UTF-8', q(k)) end
    if not T.isTensor(v) then bad_arg('tensors', 'entry %s: expected a tensor, got %s', q(k), E.describe(v)) end
    names[#names + 1] = k
  end
  table.sort(names)
  local parts = {}
  if metadata ~= nil then
    if type(metadata) ~= 'table' then E.argv(FN, 'metadata', 'a table of string -> string or nil', metadata) end
    local m = {}
    for k, v in pairs(metadata) do
      if type(k) ~= 'string' then bad_arg('metadata', 'keys must be strings, got %s', E.describe(k)) end
      if type(v) ~= 'string' then bad_arg('metadata', 'the value of %s must be a string, got %s', q(k), E.describe(v)) end
      if not utf8_valid(k) or not utf8_valid(v) then bad_arg('metadata', 'entry %s is not valid UTF-8', q(k)) end
      m[#m + 1] = json_string(k) .. ':' .. json_string(v)
    end
    table.sort(m)
    parts[1] = '"__metadata__":{' .. table.concat(m, ',') .. '}'
  end
  local sizes, off = {}, 0
  for i, k in ipairs(names) do
    local x = tbl[k]
    local nbytes = x:numel() * ST_SIZE[ST_DTYPE[x:dtype()]]
    local shape = x:size()
    for j = 1, #shape do shape[j] = string.format('%d', shape[j]) end
    parts[#parts + 1] = string.format('%s:{"dtype":"%s","shape":[%s],"data_offsets":[%.0f,%.0f]}', json_string(k),
                                      ST_DTYPE[x:dtype()], table.concat(shape, ','), off, off + nbytes)
    sizes[i] = nbytes
    off = off + nbytes
  end
  local header = '{' .. table.concat(parts, ',') .. '}'
  header = header .. string.rep(' ', (8 - #header % 8) % 8)
  if #header > MAX_HEADER then E.fail(FN, 'the header would be %d bytes, over the safetensors limit of %d', #header, MAX_HEADER) end
  local len = ffi.new('uint8_t[8]')
  local nh = #header
  for i = 0, 7 do len[i] = nh % 256; nh = math.floor(nh / 256) end

  -- the target: symlinks resolved (a save through a link updates the file it points to)
  local target = path
  local rp = C.fa_io_realpath(path, nil)
  if rp ~= nil then target = ffi.string(rp); C.fa_io_free(rp) end
  local where = FN .. ': ' .. q(path) .. ': '
  local function bad(fmt, ...) E.raise(where .. string.format(fmt, ...)) end
  local st = ffi.new('fa_io_stat')
  local exists = C.fa_io_statx(AT_FDCWD, target, 0, STATX_TYPE + STATX_MODE, st) == 0
  local mode = exists and bit.band(st.mode, S_IFMT) or S_IFREG
  if mode == S_IFDIR then bad('is a directory') end
  -- an existing device, fifo or socket is written in place: renaming over it would replace the node
  local direct = mode ~= S_IFREG

  local tmp, f
  if direct then
    f = C.fa_io_fopen(target, 'wb')
    if f == nil then bad('cannot open for writing: %s', errtext()) end
  else
    local dir, base = target:match('^(.*/)([^/]*)$')
    if not dir then dir, base = '', target end
    for _ = 1, 100 do
      tmp_counter = tmp_counter + 1
      tmp = string.format('%s.%s.tmp%d.%d', dir, base:sub(1, 200), C.fa_io_getpid(), tmp_counter) -- NAME_MAX 255
      f = C.fa_io_fopen(tmp, 'wbx') -- O_EXCL: never reuse someone else's file
      if f ~= nil or ffi.errno() ~= 17 then break end -- 17: EEXIST
    end
    if f == nil then bad('cannot create a temporary file in %s: %s', q(dir == '' and '.' or dir), errtext()) end
    -- a replaced file keeps its permission bits (a private checkpoint stays private)
    if exists and C.fa_io_fchmod(C.fa_io_fileno(f), bit.band(st.mode, 4095)) ~= 0 then
      local msg = errtext()
      C.fa_io_fclose(f)
      C.fa_io_unlink(tmp)
      bad('cannot set the permissions of the temporary file: %s', msg)
    end
  end

  local function write(ptr, n)
    if n == 0 then return end
    if tonumber(C.fa_io_fwrite(ptr, 1, n, f)) ~= n then bad('cannot write: %s', errtext()) end
  end
  local ok, err = pcall(function()
    write(len, 8)
    write(header, #header)
    for i, k in ipairs(names) do
      local x = tbl[k]
      if x:isCuda() then x = x:to('cpu') end
      x = x:contiguous()
      write(x.desc.data, sizes[i])
    end
    if C.fa_io_fflush(f) ~= 0 then bad('cannot write: %s', errtext()) end
    if not direct and C.fa_io_fsync(C.fa_io_fileno(f)) ~= 0 then bad('cannot flush to disk: %s', errtext()) end
    local rc = C.fa_io_fclose(f)
    f = nil
    if rc ~= 0 then bad('cannot close: %s', errtext()) end
    if not direct then
      if C.fa_io_rename(tmp, target) ~= 0 then bad('cannot rename the temporary file over it: %s', errtext()) end
      tmp = nil
    end
  end)
  if f ~= nil then C.fa_io_fclose(f) end
  if tmp then C.fa_io_unlink(tmp) end
  if not ok then error(err, 0) end
  if not direct then
    -- the rename itself reaches the disk with the directory (best effort: some file systems refuse)
    local dir = target:match('^(.*/)') or '.'
    local fd = C.fa_io_open(dir, 0) -- O_RDONLY
    if fd >= 0 then C.fa_io_fsync(fd); C.fa_io_close(fd) end
  end
end

return M
