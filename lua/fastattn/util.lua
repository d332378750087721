-- fa.util: small helpers shared by the example scripts (examples/train_*.lua): command-line options and the
-- device set-up before a run.
local fa = require 'fastattn'

local U = {}

-- command line {'--name', 'value', ...} -> a copy of `defaults` with the given values (numbers converted).
-- A name must be a key of defaults or be listed in opts.optional (options without a default, e.g. 'threads');
-- opts.expected: the names the unknown-argument message lists (default: the defaults' names sorted, then the
-- optional ones). A 'device' must be cpu or cuda. Errors (level 0) start with `prog`.
function U.parseArgs(prog, defaults, args, opts)
  opts = opts or {}
  local optional = {}
  for _, k in ipairs(opts.optional or {}) do optional[k] = true end
  local o = {}
  for k, v in pairs(defaults) do o[k] = v end
  local i = 1
  while args and args[i] do
    local k = args[i]:match('^%-%-([%w_]+)$')
    if not k or (o[k] == nil and not optional[k]) then
      local names = opts.expected
      if not names then
        names = {}
        for name in pairs(defaults) do names[#names + 1] = name end
        table.sort(names)
        for _, name in ipairs(opts.optional or {}) do names[#names + 1] = name end
      end
      local flags = {}
      for j, name in ipairs(names) do flags[j] = '--' .. name end
      error(prog .. ': unknown argument ' .. tostring(args[i]) .. ' (expected ' .. table.concat(flags, ', ') .. ')', 0)
    end
    local v = args[i + 1]
    if v == nil then error(prog .. ': --' .. k .. ' needs a value', 0) end
    o[k] = tonumber(v) or v
    i = i + 2
  end
  if o.device ~= nil and o.device ~= 'cpu' and o.device ~= 'cuda' then
    error(prog .. ': --device must be cpu or cuda', 0)
  end
  return o
end

-- before a run: o.threads (if given) sets the CPU thread count; o.device 'cuda' needs a CUDA device
function U.setupDevice(prog, o)
  if o.threads then fa.setNumThreads(o.threads) end
  if o.device == 'cuda' and fa.C.fa_cuda_device_count() < 1 then
    error(prog .. ': --device cuda, but no CUDA device was found (built with CUDA: '
          .. tostring(fa.C.fa_has_cuda() == 1) .. ')', 0)
  end
end

return U
