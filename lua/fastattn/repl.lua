-- repl.lua: the read-eval-print loop of `bin/fastattn` (as Torch's trepl): an expression typed alone prints
-- its values (`x` shows the tensor, `1+1` prints 2), statements run as typed, an incomplete chunk (an open
-- `for`, `function`, bracket or long string) continues on the next line, and an error is printed without
-- ending the session. Globals persist from line to line; `local` lasts one chunk, as in `lua`.
local repl = {}

local ffi = require 'ffi'

-- prompts and the banner only when a person types (a terminal, rlwrap's included), not for piped input
local function stdin_is_terminal()
  pcall(ffi.cdef, 'int isatty(int fd);')
  local ok, r = pcall(function() return ffi.C.isatty(0) == 1 end)
  return ok and r
end

-- Ctrl-C. `luajit -e` runs this loop under LuaJIT's SIGINT handler, which turns the signal into an
-- "interrupted!" error at the next Lua instruction, then falls back to the default (quit). At the prompt
-- that error would end the loop itself, so the signal is ignored while a line is read; LuaJIT's handler is
-- put back before each chunk, so a Ctrl-C stops the running chunk (not a JIT-compiled loop: LuaJIT checks
-- for it only in the interpreter) and the session goes on. Returns ignore() and restore(), or no-ops.
local function sigint_control()
  local noop = function() end
  pcall(ffi.cdef, 'typedef void (*fa_repl_sighandler)(int); fa_repl_sighandler signal(int, fa_repl_sighandler);')
  local ok, ign = pcall(ffi.cast, 'fa_repl_sighandler', 1) -- SIG_IGN
  if not ok then return noop, noop end
  local SIGINT = 2
  local got, luajit_handler = pcall(function() return ffi.C.signal(SIGINT, ign) end)
  if not got then return noop, noop end
  ffi.C.signal(SIGINT, luajit_handler)
  return function() ffi.C.signal(SIGINT, ign) end, function() ffi.C.signal(SIGINT, luajit_handler) end
end

-- a chunk that failed only because its end is missing
local function incomplete(msg)
  return msg:sub(-7) == "'<eof>'"
end

-- compiles src: as an expression list first, so an expression alone yields its values, then as
-- statements. The expression form is `(...)(src)` called with `pack`, not `return src`: a tail call would
-- drop the chunk's frame, and with it the `stdin:1:` position of an error raised by the call.
-- Returns the function and whether it is the expression form, or nil, the message and whether more input
-- may complete the chunk.
local function compile(src)
  local f = loadstring('return (...)(' .. src .. '\n)', '=stdin')
  if f then return f, true end
  local err
  f, err = loadstring(src, '=stdin')
  if f then return f, false end
  return nil, err, incomplete(err)
end

local function pack(...) return select('#', ...), { ... } end

local function print_values(n, ...)
  if n == 0 then return end
  local parts = {}
  for i = 1, n do parts[i] = tostring((select(i, ...))) end
  io.stdout:write(table.concat(parts, '\t'), '\n')
end

local function report(err)
  io.stdout:flush()
  io.stderr:write(tostring(err), '\n')
  io.stderr:flush()
end

local function pack_call(ok, ...) return ok, select('#', ...), { ... } end

-- runs one compiled chunk; its values are printed (nils included), its error reported
local function run(f, is_expr)
  local ok, n, r = pack_call(pcall(f, pack))
  if not ok then return report(r[1]) end
  if is_expr then n, r = r[1], r[2] end
  print_values(n, unpack(r, 1, n))
end

-- opts.interactive: print the banner and prompts (default: when stdin is a terminal);
-- opts.banner: the first line of the banner
function repl.run(opts)
  opts = opts or {}
  local interactive = opts.interactive
  if interactive == nil then interactive = stdin_is_terminal() end
  if interactive then
    io.stdout:write((opts.banner or 'fastattn (LuaJIT REPL)'), '\n',
      'An expression typed alone prints its value. Quit with Ctrl-D or os.exit().\n')
  end
  local ignore_sigint, restore_sigint = sigint_control()
  local buffer
  while true do
    ignore_sigint()
    if interactive then
      io.stdout:write(buffer and '>> ' or '> ')
      io.stdout:flush()
    end
    local ok, line = pcall(io.read, '*l')
    if not ok then
      report(line)
      buffer = nil
    elseif line == nil then -- end of input (Ctrl-D)
      if buffer then
        local _, err = compile(buffer)
        report(err)
      end
      if interactive then io.stdout:write('\n') end
      io.stdout:flush()
      return
    else
      if not buffer and line:sub(1, 1) == '=' then line = 'return ' .. line:sub(2) end -- Lua 5.1's `=x`
      local src = buffer and (buffer .. '\n' .. line) or line
      local f, is_expr_or_err, more = compile(src)
      if f then
        buffer = nil
        restore_sigint() -- a Ctrl-C during the chunk is its error, reported like any other
        local ok2, e = pcall(run, f, is_expr_or_err)
        if not ok2 then report(e) end
      elseif more then
        buffer = src
      else
        buffer = nil
        report(is_expr_or_err)
      end
    end
    io.stdout:flush()
  end
end

return repl
