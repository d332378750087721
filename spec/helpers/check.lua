-- spec/helpers/check.lua: shared assertions for the specs: closeness with a useful message, fixtures,
-- and float64 finite-difference gradients.
local fa = require 'fastattn'
local ffi = require 'ffi'
local luassert = require 'luassert'

local H = {}
local here = (debug.getinfo(1, 'S').source:match('^@(.*)/helpers/[^/]*$')) or 'spec'
H.fixtures_dir = here .. '/fixtures'

-- fixture file spec/fixtures/<name>.safetensors -> {name = tensor}
function H.fixture(name)
  return (fa.load(H.fixtures_dir .. '/' .. name .. '.safetensors'))
end

-- the entries of one case of a module fixture (written by spec/fixtures/gen_*.py as '<case>.<key>'), the prefix
-- removed: c.param[p] ('<case>.param.<p>'), c.grad.param[p] ('<case>.grad.param.<p>'), c.grad[k]
-- ('<case>.grad.<k>'), c[k] (the rest)
function H.fixture_case(fx, name)
  local c = { param = {}, grad = { param = {} } }
  for k, v in pairs(fx) do
    local rest = k:match('^' .. name .. '%.(.*)$')
    if rest then
      local p, gp, g = rest:match('^param%.(.*)$'), rest:match('^grad%.param%.(.*)$'), rest:match('^grad%.(.*)$')
      if p then c.param[p] = v
      elseif gp then c.grad.param[gp] = v
      elseif g then c.grad[g] = v
      else c[rest] = v end
    end
  end
  return c
end

-- asserts |a - b| <= atol + rtol*|b| elementwise; shapes must match exactly
function H.assert_close(a, b, rtol, atol, what)
  what = what or 'tensor'
  assert(fa.isTensor(a), what .. ': expected a tensor, got ' .. type(a))
  assert(fa.isTensor(b), what .. ': reference is not a tensor')
  if not a:isSameSizeAs(b) then
    error(string.format('%s: shape %s, expected %s', what, table.concat(a:size(), 'x'), table.concat(b:size(), 'x')), 2)
  end
  if not fa.allclose(a, b, rtol or 1e-5, atol or 1e-6) then
    error(string.format('%s: max |difference| %.3e exceeds atol %.1e + rtol %.1e * |ref| (max |ref| %.3e)', what,
      fa.maxAbsDiff(a, b), atol or 1e-6, rtol or 1e-5, b:to('float64', 'cpu'):abs():max()), 2)
  end
end

-- max |t| (0 for an empty tensor)
function H.maxabs(t) return fa.maxAbsDiff(t, fa.zeros_like(t)) end

-- a (any dtype, any device) against the float64 reference: |a - ref| <= t * (max|ref| + |ref|) elementwise, the
-- closeness of a low-precision result whose error scales with the largest values; NaN in a fails
function H.assert_near(a, ref, t, what)
  H.assert_close(a:to('float64', 'cpu'), ref, t, t * math.max(H.maxabs(ref), 1e-30), what)
end

-- numerical gradient of L = sum(f() * gout) with respect to x (float64, perturbed in place), by central
-- differences; f reads x itself.
function H.numgrad(f, x, gout, eps)
  eps = eps or 1e-6
  local g = fa.zeros_like(x, 'float64')
  local flat = x:view(-1)
  local gf = g:view(-1)
  local function L()
    local out = f()
    return (out:double() * gout):sum()
  end
  for i = 1, flat:numel() do
    local v = flat:get(i)
    flat:set(i, v + eps)
    local lp = L()
    flat:set(i, v - eps)
    local lm = L()
    flat:set(i, v)
    gf:set(i, (lp - lm) / (2 * eps))
  end
  return g
end

-- calls fa.C.<name>(...) directly and returns the C error message (asserting that the call failed)
function H.c_error(name, ...)
  local rc = fa.C[name](...)
  luassert.are_not.equal(0, rc, name .. ' should have failed')
  return ffi.string(fa.C.fa_last_error())
end

-- calls f(...) and returns its error message (asserting that it raised one)
function H.err_of(f, ...)
  local ok, e = pcall(f, ...)
  luassert.is_false(ok, 'expected an error')
  return tostring(e)
end

-- a pcall that must fail with a message matching pattern, raised outside the library
function H.fails(pattern, f)
  local ok, err = pcall(f)
  luassert.is_false(ok, 'expected an error matching ' .. pattern)
  err = tostring(err)
  luassert(err:find(pattern), string.format('message %q does not match %q', err, pattern))
  luassert.is_nil(err:find('lua/fastattn/', 1, true))
end

-- asserts that msg contains each of the given plain strings
function H.has(msg, ...)
  for _, s in ipairs({ ... }) do
    luassert(msg:find(s, 1, true), string.format('message %q does not contain %q', msg, s))
  end
end

-- runs an example script (path from the repo root) without its main part (_G.__FASTATTN_NO_MAIN) and
-- returns what it returns: its parts (model, batches, train loop)
function H.load_example(path)
  _G.__FASTATTN_NO_MAIN = true
  local ok, ex = pcall(dofile, path)
  _G.__FASTATTN_NO_MAIN = nil
  luassert(ok, ex)
  return ex
end

-- runs `bin/fastattn <path> <args>` from the repo root: its output (stdout and stderr) and exit code
function H.run_script(path, args)
  local p = io.popen('bin/fastattn ' .. path .. ' ' .. args .. ' 2>&1; echo "exit=$?"')
  local out = p:read('*a')
  p:close()
  local body, code = out:match('^(.-)exit=(%d+)%s*$')
  return body, tonumber(code)
end

-- the recipe lines (tab-indented) of a Makefile target
function H.make_recipe(target)
  local f = assert(io.open('Makefile'))
  local body, inside = {}, false
  for line in f:lines() do
    if inside and line:match('^\t') then body[#body + 1] = line
    elseif inside then break
    elseif line:match('^' .. target:gsub('%-', '%%-') .. ':') then inside = true end
  end
  f:close()
  return table.concat(body, '\n')
end

-- an example's short run (its parseArgs, makeModel, evaluate, train): the held-out loss on the same data (same
-- seeds) must fall below c.held x its value before training; with c.window, the mean training loss of the last
-- c.window steps must fall below c.train x that of the first ones, every loss finite. c.cuda moves the model.
-- Returns the model, the options and the losses.
function H.assert_short_run(ex, args, c)
  local o = luassert(ex.parseArgs(args))
  math.randomseed(7); fa.manualSeed(7)
  local model = ex.makeModel(o)
  if c.cuda then model = model:cuda() end
  math.randomseed(1234); fa.manualSeed(1234)
  local before = ex.evaluate(model, o, c.eval)
  math.randomseed(7); fa.manualSeed(7)
  local losses = ex.train(model, o)
  math.randomseed(1234); fa.manualSeed(1234)
  local after = ex.evaluate(model, o, c.eval)
  luassert(after.loss < c.held * before.loss,
           string.format('held-out loss did not fall enough: %.4f -> %.4f', before.loss, after.loss))
  if c.window then
    local w, first, last = c.window, 0, 0
    for i = 1, w do first, last = first + losses[i], last + losses[#losses - w + i] end
    luassert(last < c.train * first, string.format('training loss did not fall: %.4f -> %.4f', first / w, last / w))
    for _, l in ipairs(losses) do luassert(l == l and l < math.huge, 'loss is not finite') end
  end
  return model, o, losses
end

-- the SVG file an example wrote to path (removed afterwards): its text, asserted to be one <svg> element
function H.read_svg(path)
  local f = luassert(io.open(path))
  local svg = f:read('*a')
  f:close()
  os.remove(path)
  luassert.matches('^<svg', svg)
  luassert.matches('</svg>%s*$', svg)
  return svg
end

-- the SVG loss curve an example wrote to path (removed afterwards)
function H.assert_plot(path) H.read_svg(path) end

-- ex.parseArgs's message for the given arguments (asserting that it refused them with nil)
function H.arg_error(ex, ...)
  local o, err = ex.parseArgs({ ... })
  luassert.is_nil(o)
  return err
end

-- module behaviour (a module of one tensor input, float64): updateGradInput (against want_gx) and then
-- accGradParameters equal backward; a second backward of scale 0.5 accumulates the gradients to 1.5 times, each
-- named parameter gradient then 1.5 want_gp[name]; rtol, atol: against want_gx and want_gp
function H.assert_grad_parts(m, x, gout, want_gx, want_gp, rtol, atol)
  m:forward(x)
  m:zeroGradParameters()
  local g1 = m:updateGradInput(x, gout):clone()
  m:accGradParameters(x, gout, 1)
  local _, grads = m:getParameters()
  local once = grads:clone()
  H.assert_close(g1, want_gx, rtol, atol, 'updateGradInput')
  m:backward(x, gout, 0.5)
  H.assert_close(grads, once * 1.5, 1e-12, 1e-14, 'accumulated grads')
  H.assert_close(m.gradInput, g1, 1e-12, 1e-14, 'gradInput')
  for n, g in pairs(m:namedGradParameters()) do
    H.assert_close(g, want_gp[n] * 1.5, rtol, atol, n)
  end
end

-- a second forward and backward of the same size write into the first's output, gradient and the module's
-- buffers m[name] for each name of names
function H.assert_reuses_buffers(m, x, gout, names)
  local ptr = function(t) return tostring(t.desc.data) end
  local function inner()
    local t = {}
    for i, n in ipairs(names) do t[i] = ptr(m[n]) end
    return t
  end
  local y1 = ptr(m:forward(x))
  local g1 = ptr(m:backward(x, gout))
  local in1 = inner()
  luassert.are.equal(y1, ptr(m:forward(x)))
  luassert.are.equal(g1, ptr(m:backward(x, gout)))
  luassert.are.same(in1, inner())
end

-- batches: the module's output for sample 2 of x alone is its output for it within the batch
function H.assert_sample_alone(m, x, rtol, atol)
  local full = m:forward(x):clone()
  H.assert_close(m:forward(x:narrow(1, 2, 1)), full:narrow(1, 2, 1), rtol, atol, 'sample 2')
end

-- `make <target>` runs the example at path, and the example's header names `make <target>`
function H.assert_demo_target(target, path)
  luassert(H.make_recipe(target):find('bin/fastattn ' .. path, 1, true), 'make ' .. target .. ' runs it')
  local src = luassert(io.open(path)):read('*a')
  luassert(src:match('^(.-)\nlocal '):find('--   make ' .. target .. ' ', 1, true), 'the header names make ' .. target)
end

-- the example at path on the command line: --help exits 0, its text matches the pattern head and holds its usage
-- line, each of the plain strings in wants and "`make <target>` runs it"; --steps abc is refused with exit code 1;
-- `make <target>` runs it (H.assert_demo_target)
function H.assert_example_cli(path, target, head, wants)
  local out, code = H.run_script(path, '--help')
  luassert.are.equal(0, code)
  luassert.matches(head, out)
  local all = { 'usage: bin/fastattn ' .. path .. ' [options]' }
  for _, w in ipairs(wants) do all[#all + 1] = w end
  all[#all + 1] = '`make ' .. target .. '` runs it'
  for _, want in ipairs(all) do
    luassert(out:find(want, 1, true), 'help lacks ' .. want .. ':\n' .. out)
  end
  out, code = H.run_script(path, '--steps abc')
  luassert.are.equal(1, code)
  luassert.matches('option %-%-steps: expected a positive integer, got "abc"', out)
  H.assert_demo_target(target, path)
end

return H
