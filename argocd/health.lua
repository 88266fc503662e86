-- Argo CD health check for slim.agntcy.org Subscriptions and SlimChannels (both kinds share it).
-- Install it under resource.customizations.health.slim.agntcy.org_Subscription and
-- ..._SlimChannel in argocd-cm (README, "GitOps health"). Tested with lua5.4 against objects the
-- operator wrote on a real API server (tests/tests/argocd_health.rs).
local hs = {status = "Progressing", message = "Waiting for the operator"}

-- Ready=False reasons that are a step on the way, not a fault.
local progressing = {ParticipantsPending = true, CleanupPending = true}

local function condition(status, type_)
  if status == nil or status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then return c end
  end
  return nil
end

local status = obj.status
local generation = obj.metadata and obj.metadata.generation
local paused = condition(status, "Paused")
if paused ~= nil and paused.status == "True" then
  hs.status = "Suspended"
  hs.message = paused.message or "Reconciliation paused"
  return hs
end
local ready = condition(status, "Ready")
if ready == nil then
  return hs
end
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
hs.message = (ready.reason or "") .. ": " .. (ready.message or "")
if ready.status == "True" then
  hs.status = "Healthy"
elseif progressing[ready.reason] then
  hs.status = "Progressing"
else
  hs.status = "Degraded"
end
return hs
