// The gllm runtime module: the C++ core of bindings/cpp compiled into the module (no prebuilt library, no
// third-party dependency), talking over Unreal's own sockets (FSocket) instead of the core's BSD/Winsock shim.
using System.IO;
using UnrealBuildTool;

public class Gllm : ModuleRules
{
	public Gllm(ReadOnlyTargetRules Target) : base(Target)
	{
		PCHUsage = PCHUsageMode.UseExplicitOrSharedPCHs;
		CppStandard = CppStandardVersion.Cpp17;
		bEnableExceptions = false;   // the core needs neither exceptions nor RTTI (Unreal's defaults)
		bUseRTTI = false;

		PublicDependencyModuleNames.AddRange(new string[] { "Core", "CoreUObject", "Engine" });
		PrivateDependencyModuleNames.AddRange(new string[] { "Sockets", "Networking" });

		// The core's sources: a copy inside the plugin (Source/ThirdParty/gllm_core, what you ship with a game),
		// else the repository's bindings/cpp when the plugin is used from a gllm checkout.
		string Vendored = Path.Combine(PluginDirectory, "Source", "ThirdParty", "gllm_core");
		string InRepo = Path.GetFullPath(Path.Combine(PluginDirectory, "..", "..", "cpp"));
		string CoreRoot = Directory.Exists(Path.Combine(Vendored, "src")) ? Vendored : InRepo;
		if (!Directory.Exists(Path.Combine(CoreRoot, "src")))
		{
			throw new BuildException("gllm: the C++ core was not found: copy bindings/cpp/include and bindings/cpp/src to " + Vendored);
		}
		PublicIncludePaths.Add(Path.Combine(CoreRoot, "include"));
		PrivateIncludePaths.Add(CoreRoot);   // Private/GllmCore.cpp includes src/*.cpp from here
	}
}
