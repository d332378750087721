-- spec/io_spec.lua: fa.save / fa.load (safetensors). Expectations come from outside fastattn: the byte
-- strings of the reference implementation's own tests (huggingface/safetensors, tensor.rs: test_serialization,
-- test_empty), a file written by Python's standard library (spec/fixtures/gen_io.py; Debian has no
-- python3-safetensors), and headers crafted here byte by byte against the format spec.
local fa = require 'fastattn'
local ffi = require 'ffi'
local H = require 'helpers.check'

local function tmpdir()
  local p = io.popen('mktemp -d')
  local d = p:read('*l')
  p:close()
  return d
end
local function rmrf(d) os.execute("rm -rf '" .. d .. "'") end
local function readall(path)
  local f = assert(io.open(path, 'rb'))
  local s = f:read('*a')
  f:close()
  return s
end
local function writeall(path, s)
  local f = assert(io.open(path, 'wb'))
  f:write(s)
  f:close()
end
local function sh_ok(cmd) local r = os.execute(cmd); return r == 0 or r == true end
local function ls_a(d)
  local p = io.popen("ls -A '" .. d .. "'")
  local out = {}
  for l in p:lines() do out[#out + 1] = l end
  p:close()
  table.sort(out)
  return table.concat(out, ' ')
end
local function le64(n)
  local b = {}
  for i = 1, 8 do b[i] = string.char(n % 256); n = math.floor(n / 256) end
  return table.concat(b)
end
local function f32(...)
  local v = { ... }
  local a = ffi.new('float[?]', #v, v)
  return ffi.string(a, 4 * #v)
end
-- the raw bytes of a tensor in C order (an independent view of what the file must hold)
local function bytes(x)
  x = x:contiguous()
  return ffi.string(x.desc.data, x:numel() * fa.C.fa_dtype_size(x.desc.dtype))
end
local function shape(x) return table.concat(x:size(), 'x') end

local D
setup(function() D = tmpdir() end)
teardown(function() rmrf(D) end)

describe('fa.save / fa.load round trips', function()
  it('keeps every dtype, 0-D, empty and non-contiguous tensors byte for byte', function()
    local t = {
      f32 = fa.tensor({ { 1.5, -2 }, { 0.25, 3 } }),
      f64 = fa.tensor({ 0.1, -1e300, 2 ^ -1074 }, 'float64'),
      bf16 = fa.tensor({ 1, -3.5, 256 }, 'bfloat16'),
      f16 = fa.tensor({ 1, -2.5, 65504, 2 ^ -24 }, 'float16'),
      i32 = fa.tensor({ -2147483648, 0, 2147483647 }, 'int32'),
      i64 = fa.tensor({ -2 ^ 53, 2 ^ 53 }, 'int64'),
      bool = fa.tensor({ 1, 0, 0, 1 }, 'bool'),
      scalar = fa.empty({}):fill(7),
      empty = fa.zeros(0, 3),
      transposed = fa.arange(6):view(2, 3):t(),
      narrowed = fa.arange(10):double():narrow(1, 3, 4),
      expanded = fa.arange(3):float():view(1, 3):expand(2, 3),
    }
    local path = D .. '/all.safetensors'
    fa.save(path, t)
    local r = fa.load(path)
    local n = 0
    for _ in pairs(r) do n = n + 1 end
    assert.are.equal(12, n)
    for k, x in pairs(t) do
      assert.are.equal(x:dtype(), r[k]:dtype(), k)
      assert.are.equal(shape(x), shape(r[k]), k)
      assert.are.equal(bytes(x), bytes(r[k]), k)
      assert.is_true(r[k]:isContiguous(), k)
    end
    assert.are.equal(0, r.scalar:dim())
    assert.are.equal(7, r.scalar:item())
    assert.are.same({ 0, 3 }, r.empty:size())
    assert.are.same({ { 0, 3 }, { 1, 4 }, { 2, 5 } }, r.transposed:table())
    assert.are.same({ 2, 3, 4, 5 }, r.narrowed:table())
    assert.are.same({ { 0, 1, 2 }, { 0, 1, 2 } }, r.expanded:table())
  end)

  it('keeps non-ASCII and tricky names distinct, and the metadata', function()
    local names = { 'caf\195\169', 'cafe\204\129', '\240\159\152\128', 'a"b', 'a\\b', 'tab\there', 'nl\n',
                    'ctl\1\31', 'nul\0x', 'del\127', '__metadata', ' ', '{}', '[0, 8]' }
    local t = {}
    for i, k in ipairs(names) do t[k] = fa.tensor({ i }) end
    local path = D .. '/names.safetensors'
    fa.save(path, t, { ['\195\188ml'] = '\240\159\152\128', q = 'a"b\\c\n' })
    local r, meta = fa.load(path)
    local n = 0
    for _ in pairs(r) do n = n + 1 end
    assert.are.equal(#names, n)
    for i, k in ipairs(names) do assert.are.same({ i }, r[k]:table(), k) end
    assert.are.same({ ['\195\188ml'] = '\240\159\152\128', q = 'a"b\\c\n' }, meta)
    -- control characters are escaped in the header, non-ASCII is raw UTF-8
    local s = readall(path)
    assert.truthy(s:find('"ctl\\u0001\\u001f"', 1, true))
    assert.truthy(s:find('"nul\\u0000x"', 1, true))
    assert.truthy(s:find('"caf\195\169"', 1, true))
    assert.truthy(s:find('"a\\"b"', 1, true))
  end)

  it('writes the bytes the reference implementation writes (tensor.rs test_serialization, test_empty)', function()
    -- test_serialization: {"attn.0": F32 [1, 2, 3] = 0..5}
    local ref = string.char(64, 0, 0, 0, 0, 0, 0, 0) ..
                '{"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}}' .. f32(0, 1, 2, 3, 4, 5)
    fa.save(D .. '/ref.safetensors', { ['attn.0'] = fa.tensor({ { { 0, 1, 2 }, { 3, 4, 5 } } }) })
    assert.are.equal(ref, readall(D .. '/ref.safetensors'))
    -- test_empty, without and with metadata
    fa.save(D .. '/empty.safetensors', {})
    assert.are.equal(string.char(8, 0, 0, 0, 0, 0, 0, 0) .. '{}      ', readall(D .. '/empty.safetensors'))
    fa.save(D .. '/meta.safetensors', {}, { framework = 'pt' })
    assert.are.equal(string.char(40, 0, 0, 0, 0, 0, 0, 0) .. '{"__metadata__":{"framework":"pt"}}     ',
                     readall(D .. '/meta.safetensors'))
    -- and reads them
    local r = fa.load(D .. '/ref.safetensors')
    assert.are.same({ 1, 2, 3 }, r['attn.0']:size())
    local e, meta = fa.load(D .. '/meta.safetensors')
    assert.are.same({}, e)
    assert.are.same({ framework = 'pt' }, meta)
  end)

  it('writes names in sorted order, data in the same order', function()
    fa.save(D .. '/order.safetensors', { c = fa.tensor({ 3 }), a = fa.tensor({ 1 }), b = fa.tensor({ 2 }) })
    local s = readall(D .. '/order.safetensors')
    local a, b, c = s:find('"a":', 1, true), s:find('"b":', 1, true), s:find('"c":', 1, true)
    assert.is_true(a < b and b < c)
    assert.are.equal(f32(1, 2, 3), s:sub(-12))
  end)

  it('reads a file written by Python (json + struct): every dtype, \\u escapes with surrogate pairs', function()
    local r, meta = fa.load(H.fixtures_dir .. '/io_stdlib.safetensors')
    local n = 0
    for _ in pairs(r) do n = n + 1 end
    assert.are.equal(13, n)
    assert.are.same({ { 1.5, -2, 0.25 }, { 3, -0.125, r.f32:table()[2][3] } }, r.f32:table())
    assert.are.equal(f32(1.5, -2, 0.25, 3, -0.125, 1e-3), bytes(r.f32))
    assert.are.same({ 0.1, -1e300, 2 ^ -1074 }, r.f64:table())
    assert.are.same({ 1, -3.5 }, r.bf16:table())
    assert.are.same({ { 1, -2.5 }, { 65504, 2 ^ -24 } }, r.f16:table())
    assert.are.same({ -2147483648, 0, 2147483647 }, r.i32:table())
    assert.are.same({ -2 ^ 53, 2 ^ 53 }, r.i64:table())
    assert.are.equal('bool', r.bool:dtype())
    assert.are.equal(string.char(1, 0, 0, 1), bytes(r.bool))
    assert.are.equal(0, r.scalar:dim())
    assert.are.equal(7, r.scalar:item())
    assert.are.same({ 0, 4 }, r.empty:size())
    assert.are.same({ 1 }, r['caf\195\169']:table())   -- "caf\u00e9"
    assert.are.same({ 2 }, r['cafe\204\129']:table())   -- "cafe\u0301"
    assert.are.same({ 3 }, r['\240\159\152\128 smile']:table()) -- "\ud83d\ude00 smile"
    assert.are.same({ 4 }, r['quote"back\\slash\ttab\1']:table())
    assert.are.same({ made_by = 'gen_io.py', ['\195\188ml'] = '\195\164\240\159\152\128' }, meta)
  end)

  it('replaces an existing file, leaves no temporary behind, and writes through a symlink', function()
    local d = tmpdir()
    fa.save(d .. '/m.safetensors', { w = fa.tensor({ 1 }) })
    fa.save(d .. '/m.safetensors', { w = fa.tensor({ 2, 3 }) })
    assert.are.same({ 2, 3 }, fa.load(d .. '/m.safetensors').w:table())
    assert.are.equal('m.safetensors', ls_a(d))
    assert.is_true(sh_ok("ln -s m.safetensors '" .. d .. "/link'"))
    fa.save(d .. '/link', { w = fa.tensor({ 4 }) })
    assert.is_true(sh_ok("test -L '" .. d .. "/link'"))
    assert.are.same({ 4 }, fa.load(d .. '/m.safetensors').w:table())
    assert.are.equal('link m.safetensors', ls_a(d))
    -- a replaced file keeps its permission bits
    assert.is_true(sh_ok("chmod 600 '" .. d .. "/m.safetensors'"))
    fa.save(d .. '/m.safetensors', { w = fa.tensor({ 5 }) })
    local p = io.popen("stat -c %a '" .. d .. "/m.safetensors'")
    assert.are.equal('600', p:read('*l'))
    p:close()
    rmrf(d)
  end)
end)

describe('fa.load refuses hostile files', function()
  local n = 0
  -- writes bytes to a new file and returns (path, the error message of fa.load on it)
  local function load_err(s)
    n = n + 1
    local path = D .. '/bad' .. n .. '.safetensors'
    writeall(path, s)
    local ok, err = pcall(fa.load, path)
    assert.is_false(ok, 'fa.load accepted ' .. path)
    return path, err
  end
  -- the message is raised at this file's line and names the file
  local function expect(s, text)
    local path, err = load_err(s)
    assert.truthy(err:find("^spec/io_spec%.lua:%d+: fa%.load: '" .. path:gsub('%p', '%%%0') .. "': "), err)
    assert.truthy(err:find(text, 1, true), 'expected "' .. text .. '" in: ' .. err)
    assert.falsy(err:find('lua/fastattn/', 1, true), err)
  end
  local function file(header, data, hlen) return le64(hlen or #header) .. header .. (data or '') end
  local function entry(name, dt, shp, b, e)
    return string.format('"%s":{"dtype":"%s","shape":%s,"data_offsets":[%s,%s]}', name, dt, shp, b, e)
  end

  it('a file shorter than 8 bytes', function() expect('abc', '3 bytes, shorter than the 8-byte header length') end)
  it('an absurd header length', function()
    expect(le64(2 ^ 40) .. '{}', 'header length 1099511627776 is larger than the safetensors limit')
    expect(string.rep('\255', 8) .. '{}', 'header length 18446744073709551615 is larger than')
  end)
  it('a header length past the end of the file', function()
    expect(file('{}', '', 64), 'header length 64 runs past the end of the file (10 bytes)')
  end)
  it('a header that is not an object', function()
    expect(file('[]'), 'the header is an array, expected a JSON object')
    expect(file('12'), 'the header is a number, expected a JSON object')
    expect(file('"x"'), 'the header is a string, expected a JSON object')
  end)
  it('bad \\u escapes and lone surrogates', function()
    expect(file('{"\\u12G4":{}}'), 'bad \\u escape (expected 4 hex digits) at byte 2 of the header')
    expect(file('{"\\ud83d":{}}'), 'lone surrogate \\ud83d')
    expect(file('{"\\ud83dx":{}}'), 'lone surrogate \\ud83d')
    expect(file('{"\\ude00":{}}'), 'lone surrogate \\ude00')
    expect(file('{"\\q":{}}'), 'bad escape \\q')
  end)
  it('trailing garbage, duplicate keys, control characters, invalid UTF-8, unterminated strings, deep nesting', function()
    expect(file('{} x'), 'trailing characters after the JSON value at byte 3 of the header')
    expect(file('{}\0\0\0\0\0\0'), 'trailing characters')
    expect(file('{' .. entry('w', 'F32', '[1]', 0, 4) .. ',' .. entry('w', 'F32', '[1]', 4, 8) .. '}', f32(1, 2)),
           "duplicate key 'w'")
    expect(file('{"a\nb":{}}'), 'unescaped control character 0x0a in a string')
    expect(file('{"\255":{}}'), 'invalid UTF-8 at byte 2')
    expect(file('{"\237\160\128":{}}'), 'invalid UTF-8') -- an encoded surrogate (CESU-8)
    expect(file('{"\192\129":{}}'), 'invalid UTF-8')     -- an overlong form
    expect(file('{"abc'), 'unterminated string')
    expect(file('{"a":' .. string.rep('[', 100) .. string.rep(']', 100) .. '}'), 'nested more than 32 deep')
    expect(file('{"a":01}'), "expected ',' or '}'")
    expect(file('{"a" 1}'), "expected ':'")
    expect(file('{a:1}'), 'expected a string key')
  end)
  it('an entry that is not an object, with unknown keys, or missing fields', function()
    expect(file('{"w":5}'), "tensor 'w': expected an object {\"dtype\", \"shape\", \"data_offsets\"}, got a number")
    expect(file('{"w":[]}'), "tensor 'w': expected an object")
    expect(file('{"w":{"dtype":"F32","shape":[],"data_offsets":[0,4],"x":1}}', f32(1)), "tensor 'w': unknown key 'x'")
    expect(file('{"w":{"dtype":"F32","data_offsets":[0,4]}}', f32(1)), "tensor 'w': missing \"shape\"")
    expect(file('{"w":{"shape":[1],"data_offsets":[0,4]}}', f32(1)), "tensor 'w': missing \"dtype\"")
    expect(file('{"w":{"dtype":"F32","shape":[1]}}', f32(1)), "tensor 'w': missing \"data_offsets\"")
  end)
  it('unknown and refused dtypes', function()
    expect(file('{' .. entry('w', 'F33', '[1]', 0, 4) .. '}', f32(1)), "tensor 'w': unknown dtype 'F33' (expected one of F32")
    expect(file('{' .. entry('w', 'U8', '[4]', 0, 4) .. '}', f32(1)), "tensor 'w': dtype 'U8': fastattn has no tensor type for it")
    expect(file('{"w":{"dtype":4,"shape":[1],"data_offsets":[0,4]}}', f32(1)), "tensor 'w': dtype: expected a string, got 4")
  end)
  it('shapes that are not arrays of non-negative integers, or have more than 8 dimensions', function()
    expect(file('{' .. entry('w', 'F32', '4', 0, 4) .. '}', f32(1)), "tensor 'w': shape: expected an array of sizes, got 4")
    expect(file('{' .. entry('w', 'F32', '[2.5]', 0, 10) .. '}', f32(1, 2) .. 'ab'),
           "tensor 'w': shape [2.5]: size 1 is not an integer")
    expect(file('{' .. entry('w', 'F32', '[1.0]', 0, 4) .. '}', f32(1)), 'shape [1.0]: size 1 is not an integer')
    expect(file('{' .. entry('w', 'F32', '[1e0]', 0, 4) .. '}', f32(1)), 'shape [1e0]: size 1 is not an integer')
    expect(file('{' .. entry('w', 'F32', '[2,-1]', 0, 0) .. '}'), "tensor 'w': shape [2, -1]: size 2 is negative")
    expect(file('{' .. entry('w', 'F32', '["2"]', 0, 8) .. '}', f32(1, 2)), 'shape ["2"]: size 1 is a string')
    expect(file('{' .. entry('w', 'F32', '[1,1,1,1,1,1,1,1,1]', 0, 4) .. '}', f32(1)),
           "tensor 'w': shape [1, 1, 1, 1, 1, 1, 1, 1, 1]: 9 dimensions, at most 8")
    expect(file('{' .. entry('w', 'F32', '[99999999999999999999]', 0, 4) .. '}', f32(1)), 'size 1 is too large')
  end)
  it('data_offsets that are not two non-negative integers in order', function()
    expect(file('{' .. entry('w', 'F32', '[1]', -4, 0) .. '}', f32(1)),
           "tensor 'w': data_offsets [-4, 0]: begin is negative")
    expect(file('{' .. entry('w', 'F32', '[1]', 0, 4.5) .. '}', f32(1)), 'data_offsets [0, 4.5]: end is not an integer')
    expect(file('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}', f32(1, 2)),
           "tensor 'w': data_offsets: expected [begin, end], got [0, 4, 8]")
    expect(file('{"w":{"dtype":"F32","shape":[1],"data_offsets":"0,4"}}', f32(1)), 'data_offsets: expected [begin, end]')
    expect(file('{' .. entry('w', 'F32', '[1]', 8, 4) .. '}', f32(1, 2)), "tensor 'w': data_offsets [8, 4]: begin is past end")
  end)
  it('offsets that do not match the shape, checked before any allocation (1e10 elements, 8 bytes)', function()
    expect(file('{' .. entry('w', 'F32', '[2]', 0, 4) .. '}', f32(1)),
           "tensor 'w': data_offsets [0, 4] hold 4 bytes, but shape [2] of F32 needs 8")
    -- 40 GB declared: refused by arithmetic, nothing allocated
    expect(file('{' .. entry('w', 'F32', '[10000000000]', 0, 8) .. '}', f32(1, 2)),
           "tensor 'w': data_offsets [0, 8] hold 8 bytes, but shape [10000000000] of F32 needs 40000000000")
    expect(file('{' .. entry('w', 'F64', '[4294967296,4294967296]', 0, 8) .. '}', f32(1, 2)),
           "tensor 'w': shape [4294967296, 4294967296]: too many elements")
    expect(file('{' .. entry('w', 'F64', '[0,4294967296,4294967296]', 0, 0) .. '}'), 'too many elements')
  end)
  it('offsets with gaps, overlaps, past the end, or data left over', function()
    expect(file('{' .. entry('a', 'F32', '[1]', 0, 4) .. ',' .. entry('b', 'F32', '[1]', 8, 12) .. '}', f32(1, 2, 3)),
           "tensor 'b': data_offsets [8, 12] leave bytes [4, 8) of the data section unused")
    expect(file('{' .. entry('a', 'F32', '[1]', 4, 8) .. '}', f32(1, 2)),
           "tensor 'a': data_offsets [4, 8] leave bytes [0, 4) of the data section unused")
    expect(file('{' .. entry('a', 'F32', '[2]', 0, 8) .. ',' .. entry('b', 'F32', '[1]', 4, 8) .. '}', f32(1, 2)),
           "tensor 'b': data_offsets [4, 8] overlap tensor 'a' at [0, 8]")
    expect(file('{' .. entry('a', 'F32', '[2]', 0, 8) .. '}', f32(1)),
           "tensor 'a': data_offsets [0, 8] run past the end of the data section (4 bytes)")
    expect(file('{' .. entry('a', 'F32', '[1]', 0, 4) .. '}', f32(1, 2)),
           "tensor 'a': data_offsets [0, 4] end the data, but 4 more bytes follow in the file")
    expect(file('{}', 'abcd'), 'no tensors in the header, but 4 bytes of data follow it')
  end)
  it('a __metadata__ that is not an object of strings', function()
    expect(file('{"__metadata__":[]}'), '"__metadata__": expected an object of strings, got an array')
    expect(file('{"__metadata__":{"a":1}}'), "\"__metadata__\": the value of 'a' is a number, expected a string")
  end)
  it('paths that are missing, directories, not regular files, or not strings', function()
    local ok, err = pcall(fa.load, D .. '/missing.safetensors')
    assert.is_false(ok)
    assert.truthy(err:find("^spec/io_spec%.lua:%d+: fa%.load: '.*/missing%.safetensors': cannot open: No such file or directory$"), err)
    ok, err = pcall(fa.load, D)
    assert.truthy(err:find("fa.load: '" .. D .. "': is a directory, not a safetensors file", 1, true), err)
    ok, err = pcall(fa.load, '/dev/null')
    assert.truthy(err:find("fa.load: '/dev/null': is not a regular file", 1, true), err)
    ok, err = pcall(fa.load, 5)
    assert.truthy(err:find("^spec/io_spec%.lua:%d+: fa%.load: argument 'path': expected a string without NUL bytes, got 5$"), err)
    ok, err = pcall(fa.load, H.fixtures_dir .. '/io_stdlib.safetensors\0x')
    assert.truthy(err:find("fa.load: argument 'path': expected a string without NUL bytes, got", 1, true), err)
  end)
  it('a truncated file (a good file cut short)', function()
    fa.save(D .. '/good.safetensors', { w = fa.tensor({ 1, 2, 3 }) })
    local s = readall(D .. '/good.safetensors')
    expect(s:sub(1, -2), "tensor 'w': data_offsets [0, 12] run past the end of the data section (11 bytes)")
    expect(s:sub(1, 20), 'runs past the end of the file (20 bytes)')
  end)
end)

describe('fa.save', function()
  local function save_err(...)
    local ok, err = pcall(fa.save, ...)
    assert.is_false(ok)
    assert.truthy(err:find('^spec/io_spec%.lua:%d+: fa%.save: '), err)
    return err
  end
  it('checks its arguments', function()
    local x = fa.zeros(2)
    assert.truthy(save_err(5, { x = x }):find("argument 'path': expected a non-empty string without NUL bytes, got 5", 1, true))
    assert.truthy(save_err('', { x = x }):find("argument 'path': expected a non-empty string", 1, true))
    assert.truthy(save_err(D .. '/a\0b', { x = x }):find("argument 'path': expected a non-empty string without NUL bytes", 1, true))
    assert.truthy(save_err(D .. '/a', x):find("argument 'tensors': expected a table of name -> tensor, got a float32 tensor of size 2", 1, true))
    assert.truthy(save_err(D .. '/a', { x }):find("argument 'tensors': names must be non-empty strings, got 1", 1, true))
    assert.truthy(save_err(D .. '/a', { [''] = x }):find("names must be non-empty strings, got \"\"", 1, true))
    assert.truthy(save_err(D .. '/a', { w = 5 }):find("argument 'tensors': entry 'w': expected a tensor, got 5", 1, true))
    assert.truthy(save_err(D .. '/a', { ['\255'] = x }):find("name '\255' is not valid UTF-8", 1, true))
    assert.truthy(save_err(D .. '/a', { x = x }, 'm'):find("argument 'metadata': expected a table of string -> string or nil", 1, true))
    assert.truthy(save_err(D .. '/a', { x = x }, { a = 1 }):find("argument 'metadata': the value of 'a' must be a string, got 1", 1, true))
    assert.truthy(save_err(D .. '/a', { x = x }, { 'v' }):find("argument 'metadata': keys must be strings, got 1", 1, true))
    local f = io.open(D .. '/a', 'rb')
    assert.is_nil(f) -- nothing was written
  end)
  it('refuses a tensor named __metadata__', function()
    assert.truthy(save_err(D .. '/m', { __metadata__ = fa.zeros(1) })
      :find("argument 'tensors': '__metadata__' cannot name a tensor", 1, true))
  end)
  it('raises "No space left on device" on /dev/full and leaves the device node alone', function()
    local err = save_err('/dev/full', { w = fa.zeros(4) })
    assert.truthy(err:find("fa.save: '/dev/full': cannot write: No space left on device", 1, true), err)
    assert.is_true(sh_ok('test -c /dev/full'))
    fa.save('/dev/null', { w = fa.zeros(4) })
    assert.is_true(sh_ok('test -c /dev/null'))
  end)
  it('refuses a directory, and a directory that does not exist', function()
    local err = save_err(D, { w = fa.zeros(1) })
    assert.truthy(err:find("': is a directory", 1, true), err)
    err = save_err(D .. '/nodir/x.safetensors', { w = fa.zeros(1) })
    assert.truthy(err:find("cannot create a temporary file in '" .. D .. "/nodir/': No such file or directory", 1, true), err)
  end)
  it('leaves the previous file byte-identical when a write fails half-way (file size limit)', function()
    local d = tmpdir()
    local path = d .. '/ckpt.safetensors'
    fa.save(path, { w = fa.tensor({ 1, 2, 3 }) })
    local before = readall(path)
    -- a child with a 1-block file size limit (SIGXFSZ ignored: the write fails with EFBIG instead)
    local lua = string.format("local fa = require 'fastattn'; local ok, e = pcall(fa.save, %q, { w = fa.zeros(100000) }); "
                              .. "io.write(ok and 'SAVED' or e)", path)
    local p = io.popen(string.format("LUA_PATH=%q sh -c 'trap \"\" XFSZ; ulimit -f 1; exec luajit -e \"$0\"' %q 2>&1",
                                     package.path, lua))
    local out = p:read('*a')
    p:close()
    assert.truthy(out:find("fa.save: '" .. path .. "': cannot write: File too large", 1, true), out)
    assert.are.equal(before, readall(path))
    assert.are.equal('ckpt.safetensors', ls_a(d))
    rmrf(d)
  end)
end)

describe('fa.save / fa.load on the GPU #gpu', function()
  local git = fa.cuda.isAvailable() and it
              or function(name) pending(name .. ' -- skipped: no CUDA device (fa.cuda.isAvailable() is false)') end
  git('copies CUDA tensors to the host, non-contiguous included', function()
    local x = fa.arange(6):float():view(2, 3)
    local path = D .. '/gpu.safetensors'
    fa.save(path, { a = x:cuda(), b = x:cuda():t() })
    local r = fa.load(path)
    assert.are.equal('cpu', r.a:device())
    assert.are.same(x:table(), r.a:table())
    assert.are.same(x:t():table(), r.b:table())
  end)
end)
