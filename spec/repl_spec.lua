-- The REPL (bin/fastattn with no script; lua/fastattn/repl.lua), driven through a pipe as a user would type.
local fa = require 'fastattn'

-- runs `cmd` with `input` on stdin; returns stdout, stderr and the exit status
local function pipe(cmd, input)
  local fin, fout, ferr = os.tmpname(), os.tmpname(), os.tmpname()
  local f = assert(io.open(fin, 'w'))
  f:write(input)
  f:close()
  local ok, _, status = os.execute(string.format('%s < %s > %s 2> %s', cmd, fin, fout, ferr))
  local function slurp(p)
    local h = assert(io.open(p))
    local s = h:read('*a')
    h:close()
    os.remove(p)
    return s
  end
  os.remove(fin)
  -- LuaJIT's os.execute returns the raw wait status (a number); 5.2-style returns (ok, 'exit', code)
  local code = type(ok) == 'number' and math.floor(ok / 256) or status
  return slurp(fout), slurp(ferr), code
end

local function repl(input) return pipe('bin/fastattn', input) end

describe('REPL', function()
  it('prints the value of an expression typed alone', function()
    local out, err, code = repl('1+1\n')
    assert.are.equal('2\n', out)
    assert.are.equal('', err)
    assert.are.equal(0, code)
  end)

  it('shows a tensor typed alone, as print would', function()
    local out = repl('x = fa.tensor({1.5, -2, 3})\nx\n')
    assert.are.equal(tostring(fa.tensor({ 1.5, -2, 3 })) .. '\n', out)
    assert.truthy(out:find('[fa.FloatTensor of size 3]', 1, true))
  end)

  it('prints several values tab-separated, nil included', function()
    local out = repl("1, 'a', nil\nreturn 4, 5\n")
    assert.are.equal('1\ta\tnil\n4\t5\n', out)
  end)

  it('runs statements without printing and keeps globals from line to line', function()
    local out = repl('y = 20\ny / 4\nprint(y + 1)\n')
    assert.are.equal('5\n21\n', out)
  end)

  it('has fa loaded', function()
    local out = repl('fa.version\n=type(fa.zeros)\n')
    assert.are.equal(fa.version .. '\nfunction\n', out)
  end)

  it('continues an incomplete chunk on the next lines', function()
    local out = repl('for i = 1, 2 do\n  print(i * 10)\nend\nfunction f(a)\n  return a + 1\nend\nf(41)\n' ..
                     't = {\n  7,\n  8 }\n#t\ns = [[a\nb]]\ns\nfa.ones(\n2)\n')
    assert.are.equal('10\n20\n42\n2\na\nb\n' .. tostring(fa.ones(2)) .. '\n', out)
  end)

  it('prints an error at the user line and goes on', function()
    local out, err, code = repl("error('boom')\n3\n1 +* 2\n4\nnil + 1\n5\n")
    assert.are.equal('3\n4\n5\n', out)
    assert.are.equal("stdin:1: boom\nstdin:1: unexpected symbol near '1'\n" ..
                     "stdin:1: attempt to perform arithmetic on a nil value\n", err)
    assert.are.equal(0, code)
  end)

  it('reports a library error at the user line, with no position inside the library', function()
    local _, err = repl('fa.tensor({1, 2}):view(3)\n')
    assert.truthy(err:find('^stdin:1: '), err)
    assert.falsy(err:find('lua/fastattn/', 1, true), err)
  end)

  it('reports an input that ends inside an incomplete chunk', function()
    local out, err, code = repl('for i = 1, 2 do\n')
    assert.are.equal('', out)
    assert.are.equal("stdin:1: 'end' expected near '<eof>'\n", err)
    assert.are.equal(0, code)
  end)

  it('ends at os.exit() with its status, and at the end of input', function()
    local out, _, code = repl('1\nos.exit(3)\n2\n')
    assert.are.equal('1\n', out)
    assert.are.equal(3, code)
    out, _, code = repl('')
    assert.are.equal('', out)
    assert.are.equal(0, code)
  end)

  it('says how to quit, and prompts, when a person types', function()
    local out = pipe([[luajit -e "package.path = 'lua/?.lua;lua/?/init.lua;' .. package.path
      fa = require 'fastattn'; require('fastattn.repl').run { interactive = true }"]], '1+1\nfor i = 1, 1 do\nend\n')
    local first, second, rest = out:match('^([^\n]*)\n([^\n]*)\n(.*)$')
    assert.are.equal('fastattn (LuaJIT REPL)', first)
    assert.truthy(second:find('Ctrl-D', 1, true) and second:find('os.exit()', 1, true), second)
    assert.are.equal('> 2\n> >> > \n', rest)
  end)
end)
