-- Runs the README's example so that the README stays true.
describe('README example', function()
  it('runs and fits its batch', function()
    local f = assert(io.open('README.md'))
    local text = f:read('*a')
    f:close()
    local code = assert(text:match('```lua\n(.-)```'), 'no lua block in README.md')
    local printed = {}
    local env = setmetatable({ print = function(...) printed[#printed + 1] = { ... } end }, { __index = _G })
    local chunk = assert(loadstring(code, 'README'))
    setfenv(chunk, env)
    chunk()
    local loss = printed[#printed][2]
    assert.is_true(type(loss) == 'number' and loss < 0.05, 'final loss ' .. tostring(loss))
  end)
end)

-- runs a shell command; returns its stdout and whether it exited with 0
local function sh(cmd)
  local p = assert(io.popen(cmd .. '; echo "rc=$?"'))
  local out = p:read('*a')
  p:close()
  local body, rc = out:match('^(.*)rc=(%d+)\n$')
  return body, rc == '0'
end

local function readme()
  local f = assert(io.open('README.md'))
  local text = f:read('*a')
  f:close()
  return text
end

describe('README REPL transcript', function()
  it('is what bin/fastattn prints for those lines', function()
    local fa = require 'fastattn'
    local block = assert(readme():match('```\n%$ bin/fastattn\n(.-)```'), 'no REPL transcript in README.md')
    local lines = {}
    for l in block:gmatch('([^\n]*)\n') do lines[#lines + 1] = l end
    assert.are.equal('fastattn ' .. fa.version .. ' (LuaJIT REPL; fa is loaded)', lines[1])
    assert.are.equal('An expression typed alone prints its value. Quit with Ctrl-D or os.exit().', lines[2])
    local input, expected = {}, {}
    for i = 3, #lines do
      local typed = lines[i]:match('^>>? (.*)$')
      if typed then input[#input + 1] = typed .. '\n' else expected[#expected + 1] = lines[i] .. '\n' end
    end
    local tmp = os.tmpname()
    local f = assert(io.open(tmp, 'w'))
    f:write(table.concat(input))
    f:close()
    local out, ok = sh('bin/fastattn < ' .. tmp .. ' 2>&1')
    os.remove(tmp)
    assert.is_true(ok)
    assert.are.equal(table.concat(expected), out)
  end)
end)

describe('README install line', function()
  it('is the line make install prints, and with it plain luajit finds fastattn from /', function()
    local prefix = os.tmpname()
    os.remove(prefix)
    -- -o: the library as built (make install must not relink it under the running specs)
    local out, ok = sh('make -s -o build/libfastattn.so install PREFIX=' .. prefix .. ' 2>&1')
    assert.is_true(ok, out)
    local printed = assert(out:match('\n  (export LUA_PATH=[^\n]*)\n'), out)
    local shown = assert(readme():match('\n(export LUA_PATH=[^\n]*)\n'), 'no LUA_PATH line in README.md')
    assert.are.equal(shown, (printed:gsub(prefix:gsub('%p', '%%%0'), '$HOME/.local')))
    local res, ran = sh('cd / && env -u FASTATTN_LIB -u LUA_CPATH HOME=/nonexistent bash -c ' ..
      "'" .. printed .. " && luajit -e \"local fa = require [[fastattn]]; print(fa.ones(2):sum())\"' 2>&1")
    os.execute('rm -rf ' .. prefix)
    assert.is_true(ran, res)
    assert.are.equal('2\n', res)
  end)
end)
